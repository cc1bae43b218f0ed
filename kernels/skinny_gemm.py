"""Matmuls of a decode step: few rows of activations against a large weight (x @ W^T, W in
nn.Linear's [N, K] layout), read once at memory speed.

A decode step's GEMMs have M <= 64 rows, so they are bound by reading W. Each program owns
BLOCK_N output columns and one split of K: it streams its [BLOCK_N, BLOCK_K] weight tiles and
multiplies them by the transposed activations (W x^T, "swap AB"), so the weight side fills the
tensor cores' wide operand and M only pads to 16.

- `skinny_matmul(x, w)` -> x @ w^T in x's dtype (one split), or, with `partials` given, each
  split's fp32 sum into partials[split] for the consumer to add up (kernels/fused.py's rms_norm
  takes them: the split-K reduction costs no launch of its own).
- `skinny_gated(x, w)` -> silu(x @ gate^T) * (x @ up^T) for w = [gate; up] (SwiGLU's gate/up
  projection with its activation in the epilogue), rounded like the unfused torch chain.

Launchers check shapes on the host only (no syncs, no allocation when out/partials are given),
so they can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvmesh.kernels._common import check_float, dot_precision, pdl_args, pdl_wait, prefetch_l2

MAX_ROWS = 64  # activations are one [BLOCK_M, BLOCK_K] tile per step: keep it small
MAX_SPLITS = 16


@dataclass(frozen=True)
class SkinnyConfig:
    """Tiles and launch of one skinny matmul (tuned in benchmarks/kernel_bench.py)."""

    block_n: int = 64
    block_k: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 4
    # under programmatic dependent launch, the first tiles of its weights each program asks L2
    # for before waiting on the kernel before it (H200, 1B decode step at batch 32: 0, 2, 4
    # and all tiles took 1.447, 1.432, 1.477 and 1.644 ms)
    prefetch_tiles: int = 2

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if not 1 <= self.splits <= MAX_SPLITS:
            raise ValueError(f"splits must be in [1, {MAX_SPLITS}], got {self.splits}")


H200_SHARED_MEMORY = 227 << 10  # bytes of shared memory one program may use on Hopper
_SHARED_MEMORY_MARGIN = 16 << 10  # for what the compiler adds beyond the pipeline's tiles


def skinny_config(n: int, k: int, num_sms: int, *, split: bool = True, itemsize: int = 2,
                  gated: bool = False, shared_memory: int = H200_SHARED_MEMORY) -> SkinnyConfig:
    """Tiles for an [M <= 64, k] x [n, k]^T product (n: the gate half's width when gated).

    A program streams its weight tiles through a deep pipeline, so that each SM keeps enough
    bytes in flight: 64-column tiles, 128 deep with 5 stages for 2-byte elements, 64 deep with 6
    stages when gated (two weight tiles a stage), 2 stages for 4-byte elements, fewer where a
    program's shared memory (`shared_memory` bytes) holds fewer. With split, K splits in powers
    of two (up to 8, each at least 256 deep) while the programs stay within one per SM: a
    second, partial wave would run on a few SMs alone. Measured on the H200 in the Llama-3.2-1B
    decode step at batch 32 (benchmarks/RESULTS.md, issue 4 ninth pass): 1.423 ms with the
    former 4 stages (2 and 128 deep when gated) and up to 1.5 programs per SM; gated 64 deep x 6
    stages, down and o 5 stages, q/k/v 2 splits instead of 4 took 1.261 ms together."""
    block_n = SkinnyConfig.block_n
    block_k = 64 if gated else SkinnyConfig.block_k
    blocks = triton.cdiv(n, block_n)
    splits = 1
    while split and splits < 8 and blocks * splits * 2 <= num_sms \
            and k // (splits * 2) >= 256:
        splits *= 2
    # a stage holds the weight tile(s) and a [block_k, MAX_ROWS] activation tile
    weight_tiles = 2 if gated else 1
    stage_bytes = (block_n * block_k * weight_tiles + block_k * MAX_ROWS) * itemsize
    fit = (shared_memory - _SHARED_MEMORY_MARGIN) // stage_bytes
    # 16-bit: 6 stages gated; 5 for a plain matmul in one wave, 4 over several (the 1B LM
    # head, 2,004 programs: 1.256 -> 1.250 ms a step)
    deep = 6 if gated else (5 if blocks * splits <= num_sms else 4)
    stages = max(1, min(deep if itemsize <= 2 else 2, fit))
    return SkinnyConfig(block_k=block_k, splits=splits, num_stages=stages)


# M is not specialized: a decode batch of any size up to 64 reuses the kernels compiled when the
# graphs were captured instead of compiling while serving
@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_os, stride_om,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr,
    LINE: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N), splits). With GATED, N is the width of the gate half and the
    # up rows of w start N rows down.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PREFETCH_LINES > 0:
        # no kernel writes the weights: start pulling this program's first lines of them into
        # L2 while the kernel before it finishes (LINE elements per 128-byte line)
        cols = tl.minimum(k_start + tl.arange(0, PREFETCH_LINES) * LINE, K - 1)
        lines = w_ptr + tl.minimum(offs_n, N - 1)[:, None].to(tl.int64) * stride_wn \
            + cols[None, :]
        prefetch_l2(lines)
        if GATED:
            prefetch_l2(lines + N * stride_wn)
    pdl_wait(USE_PDL)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if GATED:
        up_rows = w_rows + N * stride_wn
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < k_end
        # xt: [BLOCK_K, BLOCK_M], w: [BLOCK_N, BLOCK_K]
        xt = tl.load(x_rows + k[:, None], mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
        if GATED:
            w_up = tl.load(up_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                           other=0.0)
            acc_up = tl.dot(w_up, xt, acc_up, input_precision=DOT_PRECISION)
    # out[m, n] = acc[n, m]
    out = (out_ptr + split.to(tl.int64) * stride_os + offs_m[None, :].to(tl.int64) * stride_om
           + offs_n[:, None])
    mask = mask_n[:, None] & mask_m[None, :]
    dtype = out_ptr.dtype.element_ty
    if GATED:
        # as torch: gate and up rounded to dtype, silu(gate) rounded, then the product
        gate = acc.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        tl.store(out, (act * up).to(dtype), mask=mask)
    else:
        tl.store(out, acc.to(dtype), mask=mask)


def _check(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int]:
    check_float("x", x, 2)
    check_float("w", w, 2)
    if x.dtype != w.dtype or x.device != w.device:
        raise ValueError("x and w must share dtype and device")
    m, k = x.shape
    if w.shape[1] != k:
        raise ValueError(f"w must be [N, {k}], got {tuple(w.shape)}")
    if m > MAX_ROWS:
        raise ValueError(f"skinny matmuls take at most {MAX_ROWS} rows, got {m}")
    return m, w.shape[0], k


def _output(out: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """out, checked to be [M, n] in x's dtype, or a new one."""
    m = x.shape[0]
    if out is None:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device \
            or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} on {x.device}, contiguous in its "
                         "rows")
    return out


def _launch(x, w, out, n, splits, gated, config: SkinnyConfig) -> None:
    m, k = x.shape
    if m == 0 or n == 0:
        return
    if k == 0:
        out.zero_()
        return
    k_per_split = triton.cdiv(triton.cdiv(k, splits), config.block_k) * config.block_k
    stride_os = out.stride(0) if out.dim() == 3 else 0
    pdl = pdl_args(x.device)
    line = max(1, 128 // w.element_size())
    prefetch = 0
    if pdl["USE_PDL"] and config.prefetch_tiles:
        prefetch = triton.next_power_of_2(triton.cdiv(
            min(config.prefetch_tiles * config.block_k, k_per_split), line))
    _skinny_kernel[(triton.cdiv(n, config.block_n), splits)](
        x, w, out, m, n, k, k_per_split,
        x.stride(0), w.stride(0), stride_os, out.stride(-2),
        GATED=gated, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, DOT_PRECISION=dot_precision(x.dtype),
        PREFETCH_LINES=prefetch, LINE=line,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl,
    )


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, config: SkinnyConfig | None = None, *,
                  out: torch.Tensor | None = None,
                  partials: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T.

    Without partials: returns out [M, N] in x's dtype (config.splits must be 1). With partials
    [splits, M, N] fp32 (contiguous rows): each K split's sum goes to partials[split], which is
    returned; their sum is the product.
    """
    config = config or SkinnyConfig()
    m, n, _ = _check(x, w)
    if partials is None:
        if config.splits != 1:
            raise ValueError("a split-K matmul needs partials to write into")
        out = _output(out, x, n)
        _launch(x, w, out, n, 1, False, config)
        return out
    if (partials.shape != (config.splits, m, n) or partials.dtype != torch.float32
            or partials.device != x.device or partials.stride(2) != 1):
        raise ValueError(f"partials must be [{config.splits}, {m}, {n}] float32 on {x.device}")
    _launch(x, w, partials, n, config.splits, False, config)
    return partials


def skinny_gated(x: torch.Tensor, w: torch.Tensor, config: SkinnyConfig | None = None, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for w = [gate; up] ([2I, K], gate rows first) ->
    out [M, I] in x's dtype. config.splits must be 1 (the activation needs whole sums)."""
    config = config or SkinnyConfig()
    m, two_i, _ = _check(x, w)
    if two_i % 2:
        raise ValueError(f"w must stack gate and up rows, got an odd {two_i}")
    if config.splits != 1:
        raise ValueError("a gated matmul cannot split K")
    inter = two_i // 2
    out = _output(out, x, inter)
    _launch(x, w, out, inter, 1, True, config)
    return out


class SkinnyLinears:
    """The projections of a forward over at most max_rows tokens, each weight's tiles picked
    once per shape (`skinny_config`) for a GPU of num_sms SMs."""

    def __init__(self, num_sms: int, max_rows: int = MAX_ROWS,
                 shared_memory: int = H200_SHARED_MEMORY) -> None:
        if not 1 <= max_rows <= MAX_ROWS:
            raise ValueError(f"max_rows must be in [1, {MAX_ROWS}], got {max_rows}")
        self.num_sms = num_sms
        self.max_rows = max_rows
        self.shared_memory = shared_memory
        self._configs: dict[tuple[int, int, int, bool, bool], SkinnyConfig] = {}

    def _config(self, w: torch.Tensor, split: bool, gated: bool = False) -> SkinnyConfig:
        n, k = w.shape
        key = (n, k, w.element_size(), split, gated)
        if key not in self._configs:
            self._configs[key] = skinny_config(
                n // 2 if gated else n, k, self.num_sms, split=split, itemsize=w.element_size(),
                gated=gated, shared_memory=self.shared_memory)
        return self._configs[key]

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w^T in x's dtype."""
        return skinny_matmul(x, w, self._config(w, False))

    def linear_partials(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w^T as fp32 split-K partials [splits, rows, N]: the consumer sums them."""
        config = self._config(w, True)
        partials = torch.empty((config.splits, x.shape[0], w.shape[0]), dtype=torch.float32,
                               device=x.device)
        return skinny_matmul(x, w, config, partials=partials)

    def gated(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """silu(x @ gate^T) * (x @ up^T) for w = [gate; up]."""
        return skinny_gated(x, w, self._config(w, False, gated=True))
