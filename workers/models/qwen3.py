"""Qwen3 (dense): Llama's layers with a per-head RMSNorm of q and k before RoPE (`q_norm`,
`k_norm`), an explicit head_dim (not hidden_size / heads), no bias. `attention_bias` (which
would put a bias on o_proj too) is refused. `use_sliding_window` slides the layers
`layer_types` marks, as in Qwen2."""

from __future__ import annotations

from typing import Any

from kvmesh.workers.models.causal_lm import CausalLM
from kvmesh.workers.models.config import ModelConfig, refuse_flags, windows_by_layer_type


class Qwen3ForCausalLM(CausalLM):
    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)

    @classmethod
    def config_from_hf(cls, hf: Any) -> ModelConfig:
        refuse_flags(hf, "attention_bias")
        return ModelConfig.from_hf(hf, cls.family, qk_norm=True, **windows_by_layer_type(hf))
