"""Qwen3 (dense): Llama's layers with a per-head RMSNorm of q and k before RoPE (`q_norm`,
`k_norm`), an explicit head_dim (not hidden_size / heads), no bias. `attention_bias` (which
would put a bias on o_proj too) and `use_sliding_window` are refused."""

from __future__ import annotations

from typing import Any

from kvmesh.workers.models.causal_lm import CausalLM
from kvmesh.workers.models.config import ModelConfig, refuse_flags


class Qwen3ForCausalLM(CausalLM):
    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)

    @classmethod
    def config_from_hf(cls, hf: Any) -> ModelConfig:
        refuse_flags(hf, "attention_bias", "use_sliding_window")
        return ModelConfig.from_hf(hf, cls.family, qk_norm=True)
