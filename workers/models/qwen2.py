"""Qwen2 / Qwen2.5: Llama's layers with a bias on the q, k and v projections (not on o);
tied (0.5B-3B) or untied embeddings. `use_sliding_window` is refused (transformers then slides
the layers from max_window_layers on; our kernels take no window yet)."""

from __future__ import annotations

from typing import Any

from kvmesh.workers.models.causal_lm import CausalLM
from kvmesh.workers.models.config import ModelConfig, refuse_flags


class Qwen2ForCausalLM(CausalLM):
    family = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)

    @classmethod
    def config_from_hf(cls, hf: Any) -> ModelConfig:
        refuse_flags(hf, "use_sliding_window")
        return ModelConfig.from_hf(hf, cls.family, qkv_bias=True)
