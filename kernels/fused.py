"""Fused elementwise kernels of the Llama forward: RMSNorm (+ residual add), RoPE, SiLU-and-mul.

Each replaces a chain of eager torch ops with one launch. All math is fp32; values are rounded to
the tensor's dtype where the torch module rounds them (see the references in kernels.reference).
Launchers check shapes on the host only: no device syncs, so they can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 16384  # rms_norm keeps a whole row in registers
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4 if block >= 512 else 2


def _check_float(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dim() != dim or t.dtype not in _DTYPES:
        raise ValueError(
            f"{name} must be a {dim}-d float32/float16/bfloat16 tensor, got {t.dim()}-d {t.dtype}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_like(name: str, t: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must match dtype {like.dtype} and device {like.device}, "
            f"got {t.dtype} on {t.device}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


# ---- RMSNorm ----------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per token row; the whole row stays in registers.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual_row = residual_ptr + row * stride_residual + cols
        residual = tl.load(residual_row, mask=mask, other=0.0)
        # rounded to dtype like torch's x + residual: the sum is the new residual stream
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_row, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    # LlamaRMSNorm: normalize in fp32, round to dtype, then scale by the weight in dtype
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask
    )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [num_tokens, hidden] with weight [hidden]; returns out [num_tokens, hidden].

    With residual [num_tokens, hidden]: s = x + residual is written into residual (mutated in
    place) and (rms_norm(s), residual) is returned. out, if given, is written and returned; it
    may be x itself. Rows need not be adjacent, but each row must be contiguous.
    """
    _check_float("x", x, 2)
    num_tokens, hidden = x.shape
    _check_like("weight", weight, x, (hidden,))
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden must be in [1, {MAX_HIDDEN}], got {hidden}")
    if residual is not None:
        _check_like("residual", residual, x, (num_tokens, hidden))
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    else:
        _check_like("out", out, x, (num_tokens, hidden))
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden)
        has_residual = residual is not None
        _rms_norm_kernel[(num_tokens,)](
            x,
            residual if has_residual else x,
            weight,
            out,
            x.stride(0),
            residual.stride(0) if has_residual else 0,
            out.stride(0),
            hidden,
            float(eps),
            HAS_RESIDUAL=has_residual,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    return out if residual is None else (out, residual)


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
    _check_float("q", q, 3)
    num_tokens, num_heads, head_dim = q.shape
    _check_float("k", k, 3)
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
        num_warps=_num_warps(2 * block_h * block_half),
    )


# ---- SiLU and mul -----------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
):
    # Grid: (num_tokens, cdiv(inter, BLOCK)); x row = [gate | up], each inter wide.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up]: [num_tokens, 2 * inter] -> out [num_tokens, inter].

    out, if given, is written and returned. Rows need not be adjacent, but each must be contiguous.
    """
    _check_float("x", x, 2)
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"x must be [num_tokens, 2 * inter], got odd width {width}")
    inter = width // 2
    if out is None:
        out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    else:
        _check_like("out", out, x, (num_tokens, inter))
    if num_tokens > 0 and inter > 0:
        block = min(triton.next_power_of_2(inter), 1024)
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x,
            out,
            x.stride(0),
            out.stride(0),
            inter,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    return out
