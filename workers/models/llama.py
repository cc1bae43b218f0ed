"""Llama 2 / 3.x (and SmolLM2): the shared layers as they are; RoPE default or llama3-scaled;
tied or untied embeddings."""

from __future__ import annotations

from typing import Any

from kvmesh.workers.models.causal_lm import CausalLM
from kvmesh.workers.models.config import ModelConfig, refuse_flags


class LlamaForCausalLM(CausalLM):
    family = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)

    @classmethod
    def config_from_hf(cls, hf: Any) -> ModelConfig:
        refuse_flags(hf, "attention_bias", "mlp_bias")  # bias on o_proj and the MLP too
        return ModelConfig.from_hf(hf, cls.family)
