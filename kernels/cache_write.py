"""Cache write: scatter new K/V rows into their pages through a slot mapping."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import kv_token_offset


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, pool_ptr, slot_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_page, stride_token, stride_head, layer_kv_offset, v_offset,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    # One program per token: copies num_kv_heads * head_dim elements of K and of V.
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    page_id = slot // PAGE_SIZE
    base = layer_kv_offset + kv_token_offset(page_id, slot % PAGE_SIZE, stride_page, stride_token)
    idx = tl.arange(0, BLOCK_HD)
    head = idx // HEAD_DIM
    dim = idx % HEAD_DIM
    mask = idx < NUM_KV_HEADS * HEAD_DIM
    k = tl.load(k_ptr + tok * stride_k_tok + head * stride_k_head + dim, mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + head * stride_v_head + dim, mask=mask)
    dst = pool_ptr + base + head.to(tl.int64) * stride_head + dim
    tl.store(dst, k.to(pool_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + v_offset, v.to(pool_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter k, v [num_tokens, num_kv_heads, head_dim] into kv_pool[:, layer]; mutates kv_pool.

    slot_mapping: [num_tokens] int64, slot = page_id * page_size + offset; every slot must lie in
    the pool (not checked on device, so the call stays graph-capturable).
    """
    num_pages, num_layers, _, page_size, num_kv_heads, head_dim = kv_pool.shape
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k/v shape {tuple(k.shape)}/{tuple(v.shape)} does not match the pool")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError("slot_mapping must be a [num_tokens] int64 tensor")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for {num_layers} layers")
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_pool.stride(5) != 1:
        raise ValueError("head_dim must be the innermost contiguous dimension")
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    block_hd = triton.next_power_of_2(num_kv_heads * head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_pool, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_pool.stride(0), kv_pool.stride(3), kv_pool.stride(4),
        layer * kv_pool.stride(1), kv_pool.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_HD=block_hd, num_warps=4 if block_hd >= 1024 else 2,
    )
