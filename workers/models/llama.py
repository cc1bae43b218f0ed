"""Our own Llama-family forward over a paged KV pool.

RMSNorm, RoPE (default and llama3 scaling), grouped-query attention, SwiGLU MLP, optional tied
embeddings. Parameter names mirror transformers' LlamaForCausalLM so its state dict loads as is.
Attention writes the new K/V into the pool (`write_kv`) and attends over each sequence's pages
(`paged_prefill` for mixed batches, `paged_decode` when every sequence brings one token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.kernels.reference import rotate_half


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # llama3 params, as sorted items
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, cfg: Any) -> LlamaConfig:
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                    or {})
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
            scaling = tuple(sorted((k, rope[k]) for k in keys))
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope type {rope_type!r}")
        eos = cfg.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.max_position_embeddings),
            eos_token_ids=eos_ids,
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, llama3-scaled when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    p = dict(cfg.rope_scaling)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass
class AttentionMetadata:
    """Per-step batch layout. Tokens of sequence i are rows cu_seqlens_q[i]:cu_seqlens_q[i+1]."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, page_id * page_size + offset
    page_table: torch.Tensor  # [num_seqs, max_pages] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including the new tokens
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    is_decode: bool  # every row of q attends as one query (a decode, or a short chunk's token)
    num_splits: int | None = None  # split-KV count for paged_decode; None = kernel's choice


@dataclass(frozen=True)
class AttentionOps:
    write_kv: Callable[..., None]
    paged_prefill: Callable[..., torch.Tensor]
    paged_decode: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class FewRowOps:
    """A forward over at most max_rows tokens (a decode step) reads every weight once at memory
    speed (kernels/skinny_gemm.py). The q/k/v, o and down projections hand fp32 split-K partials
    to their consumer, which sums them as it reads: q/k/v to `rope_write_kv` (kernels/
    cache_write.py: RoPE and the cache write in one launch), o and down to the next residual
    RMSNorm; gate/up applies SiLU-and-mul in its epilogue."""

    max_rows: int
    linear: Callable[..., torch.Tensor]  # (x, w) -> x @ w^T
    linear_partials: Callable[..., torch.Tensor]  # (x, w) -> [splits, rows, N] fp32
    gated: Callable[..., torch.Tensor]  # (x, [gate; up]) -> silu(x @ gate^T) * (x @ up^T)
    # (qkv or its partials, positions, cos_cache, sin_cache, kv_pool, layer, slot_mapping,
    #  num_heads) -> q [rows, num_heads, head_dim]; writes k and v into kv_pool
    rope_write_kv: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class FusedOps:
    """One-kernel replacements for chains of small torch ops (kernels/fused.py, rotary.py)."""

    # (x, weight, eps, residual=None) -> out | (out, residual); x may be split-K partials
    rms_norm: Callable[..., Any]
    rotary: Callable[..., None]  # (q, k, positions, cos_cache, sin_cache), in place
    silu_and_mul: Callable[..., torch.Tensor]  # [T, 2I] -> [T, I]
    few_rows: FewRowOps | None = None

    def few_rows_for(self, x: torch.Tensor) -> FewRowOps | None:
        """The few-row ops if x's rows are few enough for them."""
        few = self.few_rows
        return few if few is not None and x.shape[0] <= few.max_rows else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused: FusedOps | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual stream: (norm(x + residual), x + residual)."""
        if self.fused is not None:
            return self.fused.rms_norm(x, self.weight, self.eps, residual=residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(dtype)
        return out if residual is None else (out, residual)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.scale = cfg.head_dim ** -0.5
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v in one matmul (weights concatenated at load time)
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.fused: FusedOps | None = None

    def forward(self, x: torch.Tensor, rope: Rope, meta: AttentionMetadata,
                kv_pool: torch.Tensor, ops: AttentionOps) -> torch.Tensor:
        """This layer's attention output: [num_tokens, hidden], or with few-row ops its o
        projection's split-K partials [splits, num_tokens, hidden]."""
        num_tokens = x.shape[0]
        few = self.fused.few_rows_for(x) if self.fused is not None else None
        if few is not None:
            q = few.rope_write_kv(few.linear_partials(x, self.qkv_proj.weight), rope.positions,
                                  rope.cos_cache, rope.sin_cache, kv_pool, self.layer,
                                  meta.slot_mapping, self.num_heads)
            out = self._attend(q, meta, kv_pool, ops)
            return few.linear_partials(out.reshape(num_tokens, self.q_size), self.o_proj.weight)
        qkv = self.qkv_proj(x)
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        # (strided views of qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = rope.apply(q, k)
        ops.write_kv(kv_pool, self.layer, k, v, meta.slot_mapping)
        out = self._attend(q, meta, kv_pool, ops)
        return self.o_proj(out.reshape(num_tokens, self.q_size))

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata, kv_pool: torch.Tensor,
                ops: AttentionOps) -> torch.Tensor:
        if meta.is_decode:
            splits = {} if meta.num_splits is None else {"num_splits": meta.num_splits}
            return ops.paged_decode(q, kv_pool, self.layer, meta.page_table, meta.seq_lens,
                                    self.scale, **splits)
        return ops.paged_prefill(q, kv_pool, self.layer, meta.page_table, meta.cu_seqlens_q,
                                 meta.seq_lens, self.scale)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        # gate and up in one matmul: [hidden] -> [2 * intermediate], gate first
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused: FusedOps | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden], or with few-row ops the down projection's split-K partials."""
        few = self.fused.few_rows_for(x) if self.fused is not None else None
        if few is not None:
            return few.linear_partials(few.gated(x, self.gate_up_proj.weight),
                                       self.down_proj.weight)
        gate_up = self.gate_up_proj(x)
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Rope:
    """RoPE of one forward's positions: torch ops over gathered cos/sin rows, or one fused
    in-place kernel."""

    def __init__(self, positions: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor, dtype: torch.dtype, fused: FusedOps | None) -> None:
        self.fused = fused
        self.positions, self.cos_cache, self.sin_cache = positions, cos_cache, sin_cache
        if fused is None:
            # cos, sin: [num_tokens, 1, head_dim], broadcast over heads
            self.cos = cos_cache[positions].to(dtype)[:, None, :]
            self.sin = sin_cache[positions].to(dtype)[:, None, :]

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None:
            self.fused.rotary(q, k, self.positions, self.cos_cache, self.sin_cache)
            return q, k
        cos, sin = self.cos, self.sin
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope,
                meta: AttentionMetadata, kv_pool: torch.Tensor,
                ops: AttentionOps) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it): the caller adds the two in
        the next norm, which a fused kernel does in one pass (taking the output as the down
        projection's split-K partials under few-row ops)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, meta, kv_pool, ops)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LayerState:
    """The hidden state between layers: the last layer's output (or its split-K partials), the
    residual stream before it (None before the first layer), and the step's rotary tables."""

    x: torch.Tensor
    residual: torch.Tensor | None
    rope: Rope


class LlamaForCausalLM(nn.Module):
    """forward(input_ids, positions, meta, kv_pool) -> hidden [num_tokens, hidden];
    compute_logits(hidden rows) -> fp32 logits. Mutates kv_pool (writes the new tokens' K/V)."""

    def __init__(self, cfg: LlamaConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_positions = max_positions
        self.cos_cache = self.sin_cache = torch.empty(0)
        self.ops: AttentionOps | None = None
        self.fused: FusedOps | None = None

    def set_fused(self, fused: FusedOps | None) -> None:
        """Use (or with None, stop using) the fused norm / rotary / activation kernels."""
        self.fused = fused
        for module in self.modules():
            if isinstance(module, RMSNorm | LlamaMLP | LlamaAttention):
                module.fused = fused

    def load_weights(self, state_dict: dict[str, torch.Tensor], device: torch.device,
                     dtype: torch.dtype) -> None:
        """Take the weights (transformers names), moved to device/dtype; a model built on the
        meta device gets them assigned without a second copy (q/k/v and gate/up are
        concatenated into one new matrix each). Builds the RoPE tables."""
        state = {name: t.to(device=device, dtype=dtype) for name, t in state_dict.items()
                 if name != "lm_head.weight" or not self.config.tie_word_embeddings}
        state = _fuse_projections(state, self.config.num_layers)
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        allowed = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise ValueError(f"weights do not fit the model: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}")
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = rope_inv_freq(self.config)
        # freqs: [max_positions, head_dim // 2]; same fp32 products as transformers' rotary
        positions = torch.arange(self.max_positions, dtype=torch.int64).float()
        emb = torch.cat((positions[:, None] * inv_freq[None],) * 2, dim=-1)
        self.cos_cache, self.sin_cache = emb.cos().to(device), emb.sin().to(device)

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
    """transformers' separate q/k/v and gate/up weights -> our qkv_proj / gate_up_proj."""
    fused: dict[str, list[str]] = {}
    for i in range(num_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        fused[attn + "qkv_proj.weight"] = [f"{attn}{p}_proj.weight" for p in "qkv"]
        fused[mlp + "gate_up_proj.weight"] = [f"{mlp}{p}_proj.weight" for p in ("gate", "up")]
    for name, names in fused.items():
        if all(n in state for n in names):
            state[name] = torch.cat([state.pop(n) for n in names], dim=0)
    return state
