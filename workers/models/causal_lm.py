"""A decoder-only causal LM over a paged KV pool: embeddings, the decoder layers (layers.py),
the final norm and the LM head (tied or not). Each family (llama.py, qwen2.py, ...) is a small
subclass that names its transformers architectures and reads its config; the forward is shared.

Attention writes the new K/V into the pool (`write_kv`) and attends over each sequence's pages
(`paged_prefill` for mixed batches, `paged_decode` when every sequence brings one token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from kvmesh.workers.errors import ModelLoadError
from kvmesh.workers.models.config import ModelConfig
from kvmesh.workers.models.layers import Attention, DecoderLayer, GatedMLP, RMSNorm
from kvmesh.workers.models.ops import AttentionMetadata, AttentionOps, FusedOps
from kvmesh.workers.models.rotary import Rope, rope_tables


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LayerState:
    """The hidden state between layers: the last layer's output (or its split-K partials), the
    residual stream before it (None before the first layer), and the step's rotary tables."""

    x: torch.Tensor
    residual: torch.Tensor | None
    rope: Rope


class CausalLM(nn.Module):
    """forward(input_ids, positions, meta, kv_pool) -> hidden [num_tokens, hidden];
    compute_logits(hidden rows) -> fp32 logits. Mutates kv_pool (writes the new tokens' K/V).

    A family subclass sets `family`, `architectures` (transformers' class names) and
    `model_types`, and implements `config_from_hf`, which refuses what it does not implement."""

    family: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        if cfg.family != self.family:
            raise ModelLoadError(f"a {cfg.family} config given to {type(self).__name__}")
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_positions = max_positions
        self.cos_cache = self.sin_cache = torch.empty(0)
        self.ops: AttentionOps | None = None
        self.fused: FusedOps | None = None

    @classmethod
    def config_from_hf(cls, hf: Any) -> ModelConfig:
        """Our config of transformers config `hf`; ModelLoadError for anything not
        implemented."""
        raise NotImplementedError

    def set_fused(self, fused: FusedOps | None) -> None:
        """Use (or with None, stop using) the fused norm / rotary / activation kernels."""
        self.fused = fused
        for module in self.modules():
            if isinstance(module, RMSNorm | GatedMLP | Attention):
                module.fused = fused

    def load_weights(self, state_dict: dict[str, torch.Tensor], device: torch.device,
                     dtype: torch.dtype) -> None:
        """Take the weights (transformers names), moved to device/dtype; a model built on the
        meta device gets them assigned without a second copy (q/k/v and gate/up are
        concatenated into one new matrix each). Builds the RoPE tables. Raises ModelLoadError
        when the weights do not fit the config."""
        tied = self.config.tie_word_embeddings
        state = {name: t.to(device=device, dtype=dtype) for name, t in state_dict.items()
                 if name != "lm_head.weight" or not tied}
        state = _fuse_projections(state, self.config.num_layers)
        try:
            missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:  # a shape that does not match the config
            raise ModelLoadError(f"weights do not fit the {self.family} config: {exc}") from exc
        allowed = {"lm_head.weight"} if tied else set()
        if set(missing) - allowed or unexpected:
            raise ModelLoadError(f"weights do not fit the {self.family} model: missing "
                                 f"{sorted(set(missing) - allowed)[:4]}, unexpected "
                                 f"{sorted(unexpected)[:4]}")
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(self.config, self.max_positions)
        self.cos_cache, self.sin_cache = cos.to(device), sin.to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, kv_pool: torch.Tensor) -> torch.Tensor:
        state = self.start(input_ids, positions)
        self.run_layers(state, range(len(self.model.layers)), meta, kv_pool)
        return self.finish(state)

    # forward in parts (e.g. one CUDA graph per run of layers): start, run_layers over
    # consecutive ranges covering every layer in order, finish
    def start(self, input_ids: torch.Tensor, positions: torch.Tensor) -> LayerState:
        x = self.model.embed_tokens(input_ids)
        return LayerState(x, None, Rope(positions, self.cos_cache, self.sin_cache, x.dtype,
                                        self.fused))

    def run_layers(self, state: LayerState, layers: range, meta: AttentionMetadata,
                   kv_pool: torch.Tensor) -> None:
        assert self.ops is not None, "attention ops not set"
        for index in layers:
            state.x, state.residual = self.model.layers[index](
                state.x, state.residual, state.rope, meta, kv_pool, self.ops)

    def finish(self, state: LayerState) -> torch.Tensor:
        return self.model.norm(state.x, state.residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden rows in the model's dtype."""
        few = self.fused.few_rows_for(hidden) if self.fused is not None else None
        if few is not None:
            return few.linear(hidden, self.lm_head.weight)
        return self.lm_head(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden).float()


def _fuse_projections(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers' separate q/k/v and gate/up weights (and q/k/v biases) -> our qkv_proj /
    gate_up_proj."""
    fused: dict[str, list[str]] = {}
    for i in range(num_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias"):
            fused[f"{attn}qkv_proj.{kind}"] = [f"{attn}{p}_proj.{kind}" for p in "qkv"]
        fused[mlp + "gate_up_proj.weight"] = [f"{mlp}{p}_proj.weight" for p in ("gate", "up")]
    for name, names in fused.items():
        if all(n in state for n in names):
            state[name] = torch.cat([state.pop(n) for n in names], dim=0)
    return state
