"""The layers every family is built of: RMSNorm, attention over the paged KV pool (grouped
query; optional q/k/v bias and per-head q/k RMSNorm), the SwiGLU MLP and the pre-norm decoder
layer. Parameter names mirror transformers' (q/k/v and gate/up are fused at load time,
causal_lm.py) so a checkpoint's state dict loads as is.

Every layer runs three ways: torch ops, fused kernels (`FusedOps`), and for forwards of few
rows the skinny matmuls whose split-K partials their consumer sums (`FewRowOps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.workers.models.config import ModelConfig
from kvmesh.workers.models.ops import AttentionMetadata, AttentionOps, FewRowOps, FusedOps
from kvmesh.workers.models.rotary import Rope


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


class Attention(nn.Module):
    """Grouped-query attention of one layer. With `cfg.qkv_bias` the q/k/v projection has a
    bias (Qwen2); with `cfg.qk_norm` q and k are RMS-normalized per head before RoPE (Qwen3);
    with a sliding window on this layer (`cfg.window_of`) a query attends only the last
    `sliding_window` keys, itself included (a constant of the model, so CUDA graphs keep it)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.window_of(layer)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v in one matmul (weights, and biases, concatenated at load time)
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.fused: FusedOps | None = None

    def forward(self, x: torch.Tensor, rope: Rope, meta: AttentionMetadata,
                kv_pool: torch.Tensor, ops: AttentionOps) -> torch.Tensor:
        """This layer's attention output: [num_tokens, hidden], or with few-row ops its o
        projection's split-K partials [splits, num_tokens, hidden]."""
        num_tokens = x.shape[0]
        few = self.fused.few_rows_for(x) if self.fused is not None else None
        if few is not None:
            q = few.rope_write_kv(self._few_row_qkv(x, few), rope.positions, rope.cos_cache,
                                  rope.sin_cache, kv_pool, self.layer, meta.slot_mapping,
                                  self.num_heads, **self._qk_norm_args())
            out = self._attend(q, meta, kv_pool, ops)
            return few.linear_partials(out.reshape(num_tokens, self.q_size), self.o_proj.weight)
        q, k, v = self._split(self.qkv_proj(x))
        q, k = rope.apply(*self._norm_qk(q, k))
        ops.write_kv(kv_pool, self.layer, k, v, meta.slot_mapping)
        out = self._attend(q, meta, kv_pool, ops)
        return self.o_proj(out.reshape(num_tokens, self.q_size))

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        (strided views of qkv [num_tokens, q_size + 2 * kv_size])."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(num_tokens, self.num_heads, self.head_dim),
                k.view(num_tokens, self.num_kv_heads, self.head_dim),
                v.view(num_tokens, self.num_kv_heads, self.head_dim))

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k RMS-normalized per head (new tensors), or as given without q/k norm."""
        if self.q_norm is None or self.k_norm is None:
            return q, k
        # heads as rows: [num_tokens * heads, head_dim], the 2-D form the fused norm takes
        return (self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape),
                self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape))

    def _few_row_qkv(self, x: torch.Tensor, few: FewRowOps) -> torch.Tensor:
        """What rope_write_kv takes: the projection's split-K partials, the bias (if any) added
        to the first split."""
        partials = few.linear_partials(x, self.qkv_proj.weight)
        if self.qkv_proj.bias is not None:
            partials[0].add_(self.qkv_proj.bias)
        return partials

    def _qk_norm_args(self) -> dict[str, torch.Tensor | float]:
        """rope_write_kv's keywords for the q/k norm, which it applies to each head before RoPE
        (none without q/k norm)."""
        if self.q_norm is None or self.k_norm is None:
            return {}
        return {"q_norm_weight": self.q_norm.weight, "k_norm_weight": self.k_norm.weight,
                "norm_eps": self.q_norm.eps}

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata, kv_pool: torch.Tensor,
                ops: AttentionOps) -> torch.Tensor:
        window = self.sliding_window
        if meta.is_decode:
            splits = {} if meta.num_splits is None else {"num_splits": meta.num_splits}
            return ops.paged_decode(q, kv_pool, self.layer, meta.page_table, meta.seq_lens,
                                    self.scale, sliding_window=window, **splits)
        return ops.paged_prefill(q, kv_pool, self.layer, meta.page_table, meta.cu_seqlens_q,
                                 meta.seq_lens, self.scale, sliding_window=window)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
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


class DecoderLayer(nn.Module):
    """Pre-norm: attention and the MLP, each after an RMSNorm of the residual stream."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg)
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
