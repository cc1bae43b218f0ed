"""Mistral: Llama's layers; its config may set a sliding window, which then applies to every
layer (a query attends only the last `sliding_window` positions, itself included). A window
not shorter than max_position_embeddings is full attention."""

from __future__ import annotations

from typing import Any

from kvmesh.workers.models.causal_lm import CausalLM
from kvmesh.workers.models.config import ModelConfig, uniform_window


class MistralForCausalLM(CausalLM):
    family = "mistral"
    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)

    @classmethod
    def config_from_hf(cls, hf: Any) -> ModelConfig:
        return ModelConfig.from_hf(hf, cls.family, **uniform_window(hf))
