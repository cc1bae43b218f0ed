"""What a model's forward is handed by the runner: the step's attention layout and the kernels
it runs with (torch reference ops or Triton kernels, fused chains, skinny matmuls)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


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
    """The paged attention kernels (kernels/) or their torch references. paged_prefill and
    paged_decode take the layer's `sliding_window` keyword (None: every earlier key)."""

    write_kv: Callable[..., None]
    paged_prefill: Callable[..., torch.Tensor]
    paged_decode: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class FewRowOps:
    """A forward over at most max_rows tokens (a decode step) reads every weight once at memory
    speed (kernels/skinny_gemm.py). The q/k/v, o and down projections hand fp32 split-K partials
    to their consumer, which sums them as it reads: q/k/v to `rope_write_kv` (kernels/
    cache_write.py: the optional per-head q/k RMSNorm, RoPE and the cache write in one launch),
    o and down to the next residual RMSNorm; gate/up applies SiLU-and-mul in its epilogue."""

    max_rows: int
    linear: Callable[..., torch.Tensor]  # (x, w) -> x @ w^T
    linear_partials: Callable[..., torch.Tensor]  # (x, w) -> [splits, rows, N] fp32
    gated: Callable[..., torch.Tensor]  # (x, [gate; up]) -> silu(x @ gate^T) * (x @ up^T)
    # (qkv or its partials, positions, cos_cache, sin_cache, kv_pool, layer, slot_mapping,
    #  num_heads, *, q_norm_weight=None, k_norm_weight=None, norm_eps) -> q [rows, num_heads,
    #  head_dim]; writes k and v into kv_pool
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
