"""Cache write: scatter new K/V rows into their pages through a slot mapping (`write_kv`), or
finish a fused q/k/v projection in one launch: the optional per-head RMSNorm of q and k (Qwen3),
RoPE, then k and v into their pages (`rope_write_kv`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.kernels._common import kv_token_offset, num_warps_for, pdl_args, pdl_wait


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


# ---- RoPE and cache write of a fused q/k/v projection -----------------------------------------


@triton.jit
def _rms_norm_heads(lo, hi, weight_ptr, dims, eps, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Each head RMS-normalized and scaled by weight [HEAD_DIM] (in the pool's dtype), rounded as
    kernels/fused.py's rms_norm rounds a row. lo, hi: [BLOCK_H, BLOCK_HALF] fp32 halves of the
    heads, 0 in masked lanes (so they add nothing to a head's sum of squares)."""
    dtype = weight_ptr.dtype.element_ty
    inv_rms = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / HEAD_DIM + eps)
    dim_mask = dims < HALF
    weight_lo = tl.load(weight_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
    weight_hi = tl.load(weight_ptr + HALF + dims, mask=dim_mask, other=0.0).to(tl.float32)
    # normalize in fp32, round to dtype, scale by the weight in dtype (LlamaRMSNorm's order)
    lo = (lo * inv_rms[:, None]).to(dtype).to(tl.float32) * weight_lo[None, :]
    hi = (hi * inv_rms[:, None]).to(dtype).to(tl.float32) * weight_hi[None, :]
    return lo.to(dtype).to(tl.float32), hi.to(dtype).to(tl.float32)


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr, positions_ptr, cos_ptr, sin_ptr, pool_ptr, slot_ptr, q_ptr, q_norm_ptr, k_norm_ptr,
    stride_split, stride_qkv_tok, stride_cos, stride_sin, stride_q_tok, stride_q_head,
    stride_page, stride_token, stride_head, layer_kv_offset, v_offset, norm_eps,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_PARTIALS: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr, HAS_QK_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    # Grid: (num_tokens, 3): the q heads, the k heads or the v heads of one token.
    half: tl.constexpr = HEAD_DIM // 2
    tok = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    num_heads = tl.where(part == 0, NUM_HEADS, NUM_KV_HEADS)
    first_col = tl.where(part == 0, 0, NUM_HEADS + (part - 1) * NUM_KV_HEADS) * HEAD_DIM
    mask = (heads[:, None] < num_heads) & (dims[None, :] < half)
    src = qkv_ptr + tok * stride_qkv_tok + first_col + heads[:, None] * HEAD_DIM + dims[None, :]
    dtype = q_ptr.dtype.element_ty
    # lo, hi: [BLOCK_H, BLOCK_HALF], the two halves of each head, rounded to dtype as the
    # projection's output (the sum of its split-K partials, if it came in partials)
    if NUM_PARTIALS > 0:
        lo = tl.zeros([BLOCK_H, BLOCK_HALF], dtype=tl.float32)
        hi = tl.zeros([BLOCK_H, BLOCK_HALF], dtype=tl.float32)
        for split in tl.static_range(NUM_PARTIALS):
            lo += tl.load(src + split * stride_split, mask=mask, other=0.0)
            hi += tl.load(src + split * stride_split + half, mask=mask, other=0.0)
        lo = lo.to(dtype).to(tl.float32)
        hi = hi.to(dtype).to(tl.float32)
    else:
        lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if part < 2:  # q and k rotate: x * cos + rotate_half(x) * sin (as kernels/rotary.py)
        if HAS_QK_NORM:  # first each head's RMSNorm, q's and k's own weights (Qwen3)
            if part == 0:
                lo, hi = _rms_norm_heads(lo, hi, q_norm_ptr, dims, norm_eps, half, HEAD_DIM)
            else:
                lo, hi = _rms_norm_heads(lo, hi, k_norm_ptr, dims, norm_eps, half, HEAD_DIM)
        pos = tl.load(positions_ptr + tok).to(tl.int64)
        dim_mask = dims < half
        cos_lo = tl.load(cos_ptr + pos * stride_cos + dims, mask=dim_mask, other=0.0)
        cos_hi = tl.load(cos_ptr + pos * stride_cos + half + dims, mask=dim_mask, other=0.0)
        sin_lo = tl.load(sin_ptr + pos * stride_sin + dims, mask=dim_mask, other=0.0)
        sin_hi = tl.load(sin_ptr + pos * stride_sin + half + dims, mask=dim_mask, other=0.0)
        lo, hi = (lo * cos_lo[None, :] - hi * sin_lo[None, :],
                  hi * cos_hi[None, :] + lo * sin_hi[None, :])
    if part == 0:
        dst = q_ptr + tok * stride_q_tok + heads[:, None].to(tl.int64) * stride_q_head
    else:
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        dst = (pool_ptr + layer_kv_offset + (part - 1) * v_offset
               + kv_token_offset(slot // PAGE_SIZE, slot % PAGE_SIZE, stride_page, stride_token)
               + heads[:, None].to(tl.int64) * stride_head)
    tl.store(dst + dims[None, :], lo.to(dtype), mask=mask)
    tl.store(dst + half + dims[None, :], hi.to(dtype), mask=mask)


def rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                  sin_cache: torch.Tensor, kv_pool: torch.Tensor, layer: int,
                  slot_mapping: torch.Tensor, num_heads: int,
                  out: torch.Tensor | None = None, *,
                  q_norm_weight: torch.Tensor | None = None,
                  k_norm_weight: torch.Tensor | None = None,
                  norm_eps: float = 1e-6) -> torch.Tensor:
    """The rest of a fused q/k/v projection in one launch: RoPE on q and k, k and v written into
    kv_pool[:, layer] at slot_mapping (mutates kv_pool); returns q [num_tokens, num_heads,
    head_dim] in the pool's dtype (into out, if given).

    qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] in the pool's dtype, q then k
    then v; or its fp32 split-K partials [splits, num_tokens, width] (kernels/skinny_gemm.py),
    summed and rounded to the pool's dtype first. positions: [num_tokens] int64;
    cos_cache, sin_cache: [max_positions, head_dim] fp32. As `write_kv` and `rotary`, slots and
    positions are not checked on the device.

    With q_norm_weight and k_norm_weight ([head_dim] in the pool's dtype, both or neither),
    each head of q and of k is first RMS-normalized (eps norm_eps) and scaled by its weight,
    rounded as `kernels.fused.rms_norm` rounds (Qwen3's q_norm / k_norm before RoPE); v is not.
    """
    num_pages, num_layers, _, page_size, num_kv_heads, head_dim = kv_pool.shape
    width = (num_heads + 2 * num_kv_heads) * head_dim
    num_partials = qkv.shape[0] if qkv.dim() == 3 else 0
    expected_dtype = torch.float32 if num_partials else kv_pool.dtype
    if qkv.dim() not in (2, 3) or qkv.shape[-1] != width or qkv.dtype != expected_dtype:
        raise ValueError(f"qkv must be [num_tokens, {width}] {kv_pool.dtype} or "
                         f"[splits, num_tokens, {width}] float32, got {tuple(qkv.shape)} "
                         f"{qkv.dtype}")
    if qkv.stride(-1) != 1 or qkv.device != kv_pool.device or head_dim % 2:
        raise ValueError("qkv must be contiguous in its rows, on the pool's device, with an "
                         "even head_dim")
    num_tokens = qkv.shape[-2]
    if num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of {num_kv_heads} KV heads")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype != torch.int64:
        raise ValueError("slot_mapping must be a [num_tokens] int64 tensor")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be a [{num_tokens}] int64 or int32 tensor")
    for name, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if cache.dim() != 2 or cache.shape[1] != head_dim or cache.dtype != torch.float32 \
                or cache.stride(1) != 1:
            raise ValueError(f"{name} must be a [max_positions, {head_dim}] float32 tensor")
    if any(t.device != kv_pool.device for t in (positions, slot_mapping, cos_cache, sin_cache)):
        raise ValueError(f"positions, slot_mapping and the rotary tables must be on "
                         f"{kv_pool.device}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for {num_layers} layers")
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=kv_pool.dtype,
                          device=kv_pool.device)
    elif out.shape != (num_tokens, num_heads, head_dim) or out.dtype != kv_pool.dtype \
            or out.stride(2) != 1:
        raise ValueError(f"out must be [{num_tokens}, {num_heads}, {head_dim}] {kv_pool.dtype}")
    has_qk_norm = _check_qk_norm(q_norm_weight, k_norm_weight, norm_eps, kv_pool)
    if num_tokens == 0:
        return out
    block_h = triton.next_power_of_2(max(num_heads, num_kv_heads))
    block_half = triton.next_power_of_2(head_dim // 2)
    _rope_write_kv_kernel[(num_tokens, 3)](
        qkv, positions, cos_cache, sin_cache, kv_pool, slot_mapping, out,
        q_norm_weight if has_qk_norm else out, k_norm_weight if has_qk_norm else out,
        qkv.stride(0) if num_partials else 0, qkv.stride(-2), cos_cache.stride(0),
        sin_cache.stride(0), out.stride(0), out.stride(1),
        kv_pool.stride(0), kv_pool.stride(3), kv_pool.stride(4),
        layer * kv_pool.stride(1), kv_pool.stride(2), float(norm_eps),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        PAGE_SIZE=page_size, NUM_PARTIALS=num_partials, BLOCK_H=block_h,
        BLOCK_HALF=block_half, HAS_QK_NORM=has_qk_norm,
        num_warps=num_warps_for(block_h * block_half),
        **pdl_args(kv_pool.device),
    )
    return out


def _check_qk_norm(q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
                   norm_eps: float, kv_pool: torch.Tensor) -> bool:
    """Whether rope_write_kv normalizes q and k: both weights given, each [head_dim] in the
    pool's dtype on its device, contiguous; eps finite and >= 0."""
    if q_norm_weight is None and k_norm_weight is None:
        return False
    if q_norm_weight is None or k_norm_weight is None:
        raise ValueError("q_norm_weight and k_norm_weight go together: give both or neither")
    head_dim = kv_pool.shape[5]
    for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if weight.shape != (head_dim,) or weight.dtype != kv_pool.dtype \
                or weight.device != kv_pool.device or weight.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous [{head_dim}] {kv_pool.dtype} tensor "
                             f"on {kv_pool.device}, got {tuple(weight.shape)} {weight.dtype}")
    if not 0.0 <= norm_eps < float("inf"):
        raise ValueError(f"norm_eps must be finite and >= 0, got {norm_eps}")
    return True
