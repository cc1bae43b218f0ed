"""Fused RoPE (NeoX / Llama rotate-half) over q and k in place, one launch for both.

All math is fp32, rounded once to the tensor's dtype (see kernels.reference.rotary_ref). The
launcher checks shapes on the host only, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.kernels._common import check_float, num_warps_for

# ---- rotary embedding -------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    x_ptr,
    tok,
    first_head,
    stride_tok,
    stride_head,
    cos_lo,
    cos_hi,
    sin_lo,
    sin_hi,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # x_lo, x_hi: [BLOCK_H, BLOCK_HALF], the two halves of BLOCK_H heads of one token
    heads = first_head + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HALF)
    lo = x_ptr + tok * stride_tok + heads[:, None].to(tl.int64) * stride_head + dims[None, :]
    x_lo = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(lo + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x_hi, x_lo)
    out_lo = x_lo * cos_lo[None, :] - x_hi * sin_lo[None, :]
    out_hi = x_hi * cos_hi[None, :] + x_lo * sin_hi[None, :]
    tl.store(lo, out_lo.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(lo + HALF, out_hi.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cos,
    stride_sin,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    Q_HEAD_BLOCKS: tl.constexpr,
):
    # Grid: (num_tokens, q head blocks + k head blocks); q and k share one launch.
    tok = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF
    # cos, sin rows: [head_dim] fp32; both halves are read, so no symmetry is assumed
    cos_lo = tl.load(cos_ptr + pos * stride_cos + dims, mask=dim_mask, other=0.0)
    cos_hi = tl.load(cos_ptr + pos * stride_cos + HALF + dims, mask=dim_mask, other=0.0)
    sin_lo = tl.load(sin_ptr + pos * stride_sin + dims, mask=dim_mask, other=0.0)
    sin_hi = tl.load(sin_ptr + pos * stride_sin + HALF + dims, mask=dim_mask, other=0.0)
    if head_block < Q_HEAD_BLOCKS:
        _rotate_heads(
            q_ptr,
            tok,
            head_block * BLOCK_H,
            stride_q_tok,
            stride_q_head,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            NUM_HEADS,
            HALF,
            BLOCK_H,
            BLOCK_HALF,
        )
    else:
        _rotate_heads(
            k_ptr,
            tok,
            (head_block - Q_HEAD_BLOCKS) * BLOCK_H,
            stride_k_tok,
            stride_k_head,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            NUM_KV_HEADS,
            HALF,
            BLOCK_H,
            BLOCK_HALF,
        )


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> None:
    """Apply NeoX-style RoPE to q and k in place (mutates both) in one launch.

    q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim], same dtype;
    any token/head strides (views of a fused qkv output work) but head_dim contiguous.
    positions: [num_tokens] int64 (or int32); cos_cache, sin_cache: [max_positions, head_dim]
    fp32. Positions must lie in [0, max_positions): not checked on device.
    """
    check_float("q", q, 3)
    num_tokens, num_heads, head_dim = q.shape
    check_float("k", k, 3)
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(
            f"k must be [{num_tokens}, num_kv_heads, {head_dim}] to match q, got {tuple(k.shape)}"
        )
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError("q and k must share dtype and device")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if (
        positions.shape != (num_tokens,)
        or positions.dtype not in (torch.int64, torch.int32)
        or positions.device != q.device
    ):
        raise ValueError(f"positions must be a [{num_tokens}] int64 tensor on {q.device}")
    for name, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if cache.dim() != 2 or cache.shape[1] != head_dim or cache.dtype != torch.float32:
            raise ValueError(
                f"{name} must be a [max_positions, {head_dim}] float32 tensor, "
                f"got {tuple(cache.shape)} {cache.dtype}"
            )
        if cache.device != q.device or cache.stride(1) != 1:
            raise ValueError(f"{name} must be on {q.device} and contiguous in its last dimension")
    num_kv_heads = k.shape[1]
    if num_tokens == 0 or num_heads + num_kv_heads == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    # about 1024 elements per program; a program never mixes q and k heads
    block_h = min(triton.next_power_of_2(max(num_heads, num_kv_heads)), max(1, 512 // block_half))
    q_head_blocks = triton.cdiv(num_heads, block_h)
    grid = (num_tokens, q_head_blocks + triton.cdiv(num_kv_heads, block_h))
    _rotary_kernel[grid](
        q,
        k,
        positions,
        cos_cache,
        sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_cache.stride(0),
        sin_cache.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        Q_HEAD_BLOCKS=q_head_blocks,
        num_warps=num_warps_for(2 * block_h * block_half),
    )
