"""Fused elementwise kernels of the Llama forward: RMSNorm (+ residual add) and SiLU-and-mul
(RoPE is in kernels/rotary.py).

Each replaces a chain of eager torch ops with one launch. All math is fp32; values are rounded to
the tensor's dtype where the torch module rounds them (see the references in kernels.reference).
Launchers check shapes on the host only: no device syncs, so they can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_float, check_like, num_warps_for

MAX_HIDDEN = 16384  # rms_norm keeps a whole row in registers


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
    check_float("x", x, 2)
    num_tokens, hidden = x.shape
    check_like("weight", weight, x, (hidden,))
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden must be in [1, {MAX_HIDDEN}], got {hidden}")
    if residual is not None:
        check_like("residual", residual, x, (num_tokens, hidden))
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    else:
        check_like("out", out, x, (num_tokens, hidden))
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
            num_warps=num_warps_for(block),
        )
    return out if residual is None else (out, residual)


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
    check_float("x", x, 2)
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"x must be [num_tokens, 2 * inter], got odd width {width}")
    inter = width // 2
    if out is None:
        out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    else:
        check_like("out", out, x, (num_tokens, inter))
    if num_tokens > 0 and inter > 0:
        block = min(triton.next_power_of_2(inter), 1024)
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x,
            out,
            x.stride(0),
            out.stride(0),
            inter,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
    return out
