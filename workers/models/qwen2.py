"""Qwen2 / Qwen2.5: Llama's layers with a bias on the q, k and v projections (not on o);
tied (0.5B-3B) or untied embeddings. With `use_sliding_window` the layers transformers'
`layer_types` marks "sliding_attention" (by default those from max_window_layers on) slide by
`sliding_window`; the others attend every key."""

from __future__ import annotations

from typing import Any

from kvmesh.workers.models.causal_lm import CausalLM
from kvmesh.workers.models.config import ModelConfig, windows_by_layer_type


class Qwen2ForCausalLM(CausalLM):
    family = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)

    @classmethod
    def config_from_hf(cls, hf: Any) -> ModelConfig:
        return ModelConfig.from_hf(hf, cls.family, qkv_bias=True, **windows_by_layer_type(hf))
