"""Mistral: Llama's layers; its config may set a sliding window (a query attends only the
last `sliding_window` positions). Until the paged kernels take a window, a window shorter than
the context is refused."""

from __future__ import annotations

from typing import Any

from kvmesh.workers.models.causal_lm import CausalLM
from kvmesh.workers.models.config import ModelConfig, refuse_sliding_window, window_if_effective


class MistralForCausalLM(CausalLM):
    family = "mistral"
    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)

    @classmethod
    def config_from_hf(cls, hf: Any) -> ModelConfig:
        window = window_if_effective(hf, getattr(hf, "sliding_window", None))
        cfg = ModelConfig.from_hf(hf, cls.family, sliding_window=window)
        refuse_sliding_window(hf, cfg)
        return cfg
