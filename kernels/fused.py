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

from kvmesh.kernels._common import check_float, check_like, num_warps_for, pdl_args, pdl_wait

MAX_HIDDEN = 16384  # rms_norm keeps a whole row in registers


# ---- RMSNorm ----------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_split,
    stride_x,
    stride_residual,
    stride_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    # One program per token row; the whole row stays in registers.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    if NUM_PARTIALS > 0:
        # x is split-K partials of a matmul: their sum, rounded to dtype as the matmul's output
        xf = tl.zeros([BLOCK], dtype=tl.float32)
        for split in tl.static_range(NUM_PARTIALS):
            xf += tl.load(x_ptr + split * stride_split + row * stride_x + cols, mask=mask,
                          other=0.0)
        x = xf.to(dtype)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual_row = residual_ptr + row * stride_residual + cols
        residual = tl.load(residual_row, mask=mask, other=0.0)
        # rounded to dtype like torch's x + residual: the sum is the new residual stream
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(residual_row, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    # LlamaRMSNorm: normalize in fp32, round to dtype, then scale by the weight in dtype
    normed = (xf * inv_rms).to(dtype).to(tl.float32)
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

    x may also be fp32 split-K partials [splits, num_tokens, hidden] of a matmul
    (kernels/skinny_gemm.py): their sum, rounded to weight's dtype, is the row normalized.
    With residual [num_tokens, hidden]: s = x + residual is written into residual (mutated in
    place) and (rms_norm(s), residual) is returned. out, if given, is written and returned; it
    may be x itself. Rows need not be adjacent, but each row must be contiguous.
    """
    num_partials = 0
    if x.dim() == 3:
        if x.dtype != torch.float32:
            raise ValueError(f"split-K partials must be float32, got {x.dtype}")
        num_partials = x.shape[0]
        if num_partials < 1:
            raise ValueError("split-K partials need at least one split")
        check_float("x", x, 3)
    else:
        check_float("x", x, 2)
    num_tokens, hidden = x.shape[-2:]
    check_float("weight", weight, 1)
    if weight.device != x.device:
        raise ValueError(f"weight must be on {x.device}")
    like = weight if num_partials else x  # out and residual take this dtype
    check_like("weight", weight, like, (hidden,))
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden must be in [1, {MAX_HIDDEN}], got {hidden}")
    if residual is not None:
        check_like("residual", residual, like, (num_tokens, hidden))
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=like.dtype, device=x.device)
    else:
        check_like("out", out, like, (num_tokens, hidden))
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden)
        has_residual = residual is not None
        _rms_norm_kernel[(num_tokens,)](
            x,
            residual if has_residual else x,
            weight,
            out,
            x.stride(0) if num_partials else 0,
            x.stride(-2),
            residual.stride(0) if has_residual else 0,
            out.stride(0),
            hidden,
            float(eps),
            HAS_RESIDUAL=has_residual,
            NUM_PARTIALS=num_partials,
            BLOCK=block,
            # partials are several rows' worth of loads: more warps keep more in flight
            num_warps=16 if num_partials and block >= 1024 else num_warps_for(block),
            **pdl_args(x.device),
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
