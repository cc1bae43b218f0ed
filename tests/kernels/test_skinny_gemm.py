"""Skinny (decode-step) matmuls vs fp64 and torch's own matmul in the same dtype.

On CPU only float32 runs: Triton's interpreter gives wrong tl.dot results for 16-bit inputs, so
the bf16/fp16 cases are GPU-only. The CPU cases use small tiles (16/32 wide) so that a few dozen
columns and a few hundred of K already span several tiles and K splits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from paged_kv_data import DEVICE

from kvmesh.kernels.skinny_gemm import (
    MAX_ROWS,
    SkinnyConfig,
    SkinnyLinears,
    skinny_config,
    skinny_gated,
    skinny_matmul,
)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_DTYPES = [pytest.param(d, marks=[gpu, needs_cuda]) for d in (torch.bfloat16, torch.float16)]
# per-dtype (atol, rtol) against fp64 and against torch's matmul in dtype, for outputs of about
# unit scale (w is scaled by 1/sqrt(K)); 16-bit outputs are rounded once or (gated) thrice
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
SMALL_TILES = [
    SkinnyConfig(block_n=16, block_k=32),
    SkinnyConfig(block_n=32, block_k=16),
    SkinnyConfig(),  # the 64 x 128 default: one tile of N, K < block_k or two K tiles
]


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)


def operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """x [m, k], w [n, k] with x @ w^T of about unit scale."""
    x = randn(m, k, dtype=dtype, seed=seed)
    w = randn(n, k, dtype=dtype, seed=seed + 1, scale=1 / math.sqrt(max(k, 1)))
    return x, w


def matmul_fp64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


def gated_fp64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = matmul_fp64(x, w).chunk(2, dim=-1)
    return F.silu(gate) * up


def gated_torch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The unfused chain in x's dtype: gate_up = x @ w^T, then silu(gate) * up."""
    gate, up = (x @ w.T).chunk(2, dim=-1)
    return F.silu(gate) * up


def small_config(splits: int = 1) -> SkinnyConfig:
    return SkinnyConfig(block_n=16, block_k=32, splits=splits)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "output holds NaN: a tile was not written"
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


# ---- skinny_matmul ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", SMALL_TILES, ids=lambda c: f"{c.block_n}x{c.block_k}")
@pytest.mark.parametrize("n, k", [(70, 130), (33, 257), (200, 96), (41, 20)])
@pytest.mark.parametrize("m", [1, 5, 17, 64])
def test_matmul_fp32(m, n, k, config):
    x, w = operands(m, n, k, torch.float32, seed=m + n)
    out = skinny_matmul(x, w, config)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_close(out, matmul_fp64(x, w), torch.float32)


@pytest.mark.parametrize("splits", [1, 3, 4])
@pytest.mark.parametrize("n, k", [(70, 130), (33, 257), (200, 96), (41, 20)])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_matmul_partials_sum_to_product(m, n, k, splits):
    # 96 deep in 4 splits of 32-deep tiles leaves the last split empty, as does K = 20 < block_k
    # in any split but the first: every split must still write its (zero) partial over the NaN
    config = SkinnyConfig(block_n=32, block_k=32, splits=splits)
    x, w = operands(m, n, k, torch.float32, seed=splits)
    partials = torch.full((splits, m, n), math.nan, device=DEVICE)
    assert skinny_matmul(x, w, config, partials=partials) is partials
    assert not partials.isnan().any()
    assert_close(partials.sum(0), matmul_fp64(x, w), torch.float32)


def test_matmul_writes_out_and_reads_strided_rows():
    # x and w rows spaced apart (slices of wider buffers); out a slice of a wider NaN buffer
    x_wide, w_wide = operands(5, 70, 300, torch.float32, seed=3)
    x, w = x_wide[:, :130], w_wide[:, 100:230]
    out_wide = torch.full((5, 90), math.nan, device=DEVICE)
    out = out_wide[:, 10:80]
    assert skinny_matmul(x, w, small_config(), out=out) is out
    assert_close(out, matmul_fp64(x, w), torch.float32)
    assert out_wide[:, :10].isnan().all() and out_wide[:, 80:].isnan().all()


def test_empty_dimensions():
    x, w = operands(3, 20, 0, torch.float32)
    assert torch.equal(skinny_matmul(x, w, small_config()), torch.zeros(3, 20, device=DEVICE))
    partials = torch.full((3, 3, 20), math.nan, device=DEVICE)
    skinny_matmul(x, w, small_config(3), partials=partials)
    assert torch.equal(partials, torch.zeros(3, 3, 20, device=DEVICE))
    x, w = operands(0, 20, 64, torch.float32)
    assert skinny_matmul(x, w, small_config()).shape == (0, 20)
    x, w = operands(4, 0, 64, torch.float32)
    assert skinny_matmul(x, w, small_config()).shape == (4, 0)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m", [1, 32, 64])
def test_matmul_16bit_at_model_shapes(m, dtype):
    n, k = 3072, 2048
    x, w = operands(m, n, k, dtype, seed=m)
    out = skinny_matmul(x, w)
    assert out.dtype == dtype
    assert_close(out, x @ w.T, dtype)
    assert_close(out, matmul_fp64(x, w), dtype)
    config = skinny_config(n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    partials = torch.empty(config.splits, m, n, device=DEVICE)
    skinny_matmul(x, w, config, partials=partials)
    # the fp32 partials hold the unrounded product
    torch.testing.assert_close(partials.sum(0).double(), matmul_fp64(x, w), atol=1e-4, rtol=1e-4)


# ---- skinny_gated -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", SMALL_TILES[:2], ids=lambda c: f"{c.block_n}x{c.block_k}")
@pytest.mark.parametrize("inter, k", [(33, 130), (100, 257), (8, 20)])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_gated_fp32(m, inter, k, config):
    x, w = operands(m, 2 * inter, k, torch.float32, seed=inter)
    w = w * 3  # gate values of a few units: silu's curve, not just its linear part
    out = skinny_gated(x, w, config)
    assert out.shape == (m, inter) and out.dtype == torch.float32
    assert_close(out, gated_torch(x, w), torch.float32)
    assert_close(out, gated_fp64(x, w), torch.float32)


def test_gated_writes_out():
    x, w = operands(5, 66, 130, torch.float32, seed=4)
    out_wide = torch.full((5, 40), math.nan, device=DEVICE)
    out = out_wide[:, 3:36]
    assert skinny_gated(x, w, small_config(), out=out) is out
    assert_close(out, gated_fp64(x, w), torch.float32)
    assert out_wide[:, :3].isnan().all() and out_wide[:, 36:].isnan().all()


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m", [1, 32, 64])
def test_gated_16bit_at_model_shapes(m, dtype):
    inter, k = 1000, 2048  # an intermediate size that is no multiple of block_n
    x, w = operands(m, 2 * inter, k, dtype, seed=m)
    w = w * 3
    out = skinny_gated(x, w)
    assert out.dtype == dtype
    assert_close(out, gated_torch(x, w), dtype)
    assert_close(out, gated_fp64(x, w), dtype)


# ---- SkinnyLinears ----------------------------------------------------------------------------


def test_linears_match_torch():
    # 132 SMs: [70, 1024] gets 4 splits of 256; the default 64 x 128 tiles
    linears = SkinnyLinears(num_sms=132)
    x, w = operands(5, 70, 1024, torch.float32, seed=6)
    assert_close(linears.linear(x, w), matmul_fp64(x, w), torch.float32)
    partials = linears.linear_partials(x, w)
    assert partials.shape == (4, 5, 70) and partials.dtype == torch.float32
    assert_close(partials.sum(0), matmul_fp64(x, w), torch.float32)
    x, w_gate_up = operands(5, 2 * 35, 256, torch.float32, seed=7)
    assert_close(linears.gated(x, w_gate_up), gated_fp64(x, w_gate_up), torch.float32)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_linears_16bit(dtype):
    linears = SkinnyLinears(torch.cuda.get_device_properties(0).multi_processor_count)
    x, w = operands(32, 3072, 2048, dtype, seed=8)
    assert_close(linears.linear(x, w), x @ w.T, dtype)
    partials = linears.linear_partials(x, w)
    assert partials.shape[0] > 1
    assert_close(partials.sum(0).to(dtype), x @ w.T, dtype)
    x, w = operands(32, 2 * 1000, 2048, dtype, seed=9)
    assert_close(linears.gated(x, w), gated_torch(x, w), dtype)


# ---- skinny_config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, k, splits",
    [
        (3072, 2048, 2),  # 48 column blocks: 4 splits would be 192 programs on 132 SMs
        (2048, 2048, 4),  # 128 programs; 8 splits would be 256
        (2048, 8192, 4),
        (6144, 4096, 1),  # 96 blocks: 2 splits would be 192 programs
        (4096, 14336, 2),
        (128256, 2048, 1),  # lm_head: enough column blocks already
    ],
)
def test_skinny_config_picks_splits(n, k, splits):
    # 5 stages in one wave of programs, 4 over several (the LM head)
    stages = 5 if n <= 132 * 64 else 4
    assert skinny_config(n, k, 132) == SkinnyConfig(splits=splits, num_stages=stages)
    assert skinny_config(n, k, 132, split=False) == SkinnyConfig(splits=1, num_stages=stages)
    # 4-byte elements get 2 stages; a gated matmul's two weight tiles are 64 deep, 6 stages
    assert skinny_config(n, k, 132, itemsize=4) == SkinnyConfig(splits=splits, num_stages=2)
    assert skinny_config(n, k, 132, gated=True) == SkinnyConfig(block_k=64, splits=splits,
                                                                num_stages=6)


@pytest.mark.parametrize(
    "shared_kib, itemsize, gated, stages",
    [
        (227, 2, False, 5),  # H200 / H100
        (227, 2, True, 6),
        (227, 4, True, 2),
        (163, 2, False, 4),  # A100
        (163, 2, True, 6),
        (163, 4, False, 2),
        (99, 2, False, 2),  # sm_86 / sm_89
        (99, 2, True, 3),
        (99, 4, False, 1),
    ],
)
def test_skinny_config_stages_fit_shared_memory(shared_kib, itemsize, gated, stages):
    config = skinny_config(2048, 2048, 132, itemsize=itemsize, gated=gated,
                           shared_memory=shared_kib << 10)
    assert config.num_stages == stages
    # each stage: the weight tile(s) and a [block_k, 64] activation tile
    block_k = 64 if gated else 128
    assert config.block_k == block_k
    stage = (64 * block_k * (2 if gated else 1) + block_k * 64) * itemsize
    assert stages == 1 or stages * stage <= (shared_kib << 10) - (16 << 10)


@pytest.mark.parametrize("num_sms", [1, 16, 132])
def test_skinny_config_bounds(num_sms):
    for n in (1, 64, 100, 1000, 3072, 50_000):
        for k in (16, 255, 256, 511, 512, 2048, 100_000):
            splits = skinny_config(n, k, num_sms).splits
            assert splits in (1, 2, 4, 8)
            if splits > 1:
                assert k // splits >= 256, (n, k, splits)  # each split at least 256 deep
                programs = math.ceil(n / 64) * splits
                assert programs <= num_sms, (n, k, splits)  # one wave


# ---- bad input --------------------------------------------------------------------------------


def test_bad_input_raises_value_error():
    x, w = operands(5, 40, 64, torch.float32)
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_matmul(torch.zeros(MAX_ROWS + 1, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="needs partials"):
        skinny_matmul(x, w, small_config(3))
    with pytest.raises(ValueError, match="partials must be"):
        skinny_matmul(x, w, small_config(3), partials=torch.empty(2, 5, 40, device=DEVICE))
    with pytest.raises(ValueError, match="partials must be"):
        skinny_matmul(x, w, small_config(3), partials=torch.empty(3, 5, 41, device=DEVICE))
    with pytest.raises(ValueError, match="partials must be"):
        partials = torch.empty(3, 5, 40, dtype=torch.float16, device=DEVICE)
        skinny_matmul(x, w, small_config(3), partials=partials)
    with pytest.raises(ValueError, match="share dtype"):
        skinny_matmul(x, w.half())
    with pytest.raises(ValueError, match="w must be"):
        skinny_matmul(x, w[:, :32])
    with pytest.raises(ValueError, match="out must be"):
        skinny_matmul(x, w, out=torch.empty(5, 41, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        skinny_matmul(x, w, out=torch.empty(5, 40, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        skinny_matmul(x.long(), w.long())

    with pytest.raises(ValueError, match="odd"):
        skinny_gated(x, w[:39])
    with pytest.raises(ValueError, match="cannot split"):
        skinny_gated(x, w, small_config(2))
    with pytest.raises(ValueError, match="share dtype"):
        skinny_gated(x.half(), w)
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_gated(torch.zeros(MAX_ROWS + 1, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="out must be"):
        skinny_gated(x, w, out=torch.empty(5, 40, device=DEVICE))

    for bad in ({"block_n": 24}, {"block_k": 8}, {"splits": 0}, {"splits": 17}):
        with pytest.raises(ValueError):
            SkinnyConfig(**bad)
    for max_rows in (0, MAX_ROWS + 1):
        with pytest.raises(ValueError, match="max_rows"):
            SkinnyLinears(132, max_rows)
