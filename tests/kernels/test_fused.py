"""Fused rms_norm / rotary / silu_and_mul vs their torch references and an fp64 computation."""

from __future__ import annotations

import pytest
import torch
from paged_kv_data import DEVICE, round_like_kernel, sum_partials

from kvmesh.kernels import (
    rms_norm,
    rms_norm_ref,
    rotary,
    rotary_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from kvmesh.workers.models.layers import RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# per-dtype (atol, rtol): kernel vs reference and vs fp64; the outputs are rounded to dtype once
# or twice (rms_norm rounds the normalized row, then the product with the weight)
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
EPS = 1e-5
# Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest even as the GPU does,
# so on CPU a bf16 result that should be bit-exact may be one ulp (2^-7 relative) towards zero
INTERPRETED_BF16_RTOL = 2**-7 if DEVICE == "cpu" else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol = INTERPRETED_BF16_RTOL if actual.dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(actual, expected, atol=0.0, rtol=rtol)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def rms_norm_fp64(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    return weight.double() * xd / (xd.pow(2).mean(-1, keepdim=True) + EPS).sqrt()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 200, 2048])
@pytest.mark.parametrize("num_tokens", [1, 9, 41])
def test_rms_norm(num_tokens, hidden, dtype):
    x = randn(num_tokens, hidden, dtype=dtype, seed=hidden)
    weight = 1 + 0.1 * randn(hidden, dtype=dtype, seed=1)
    out = rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, rms_norm_ref(x, weight, EPS), dtype)
    assert_close(out, rms_norm_fp64(x, weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [200, 2048])
@pytest.mark.parametrize("num_tokens", [1, 41])
def test_rms_norm_adds_residual_in_place(num_tokens, hidden, dtype):
    x = randn(num_tokens, hidden, dtype=dtype, seed=2)
    residual = randn(num_tokens, hidden, dtype=dtype, seed=3)
    weight = 1 + 0.1 * randn(hidden, dtype=dtype, seed=4)
    expected_sum = x + residual  # the model's x + attn_out, rounded in dtype
    ref_residual = residual.clone()
    out, new_residual = rms_norm(x, weight, EPS, residual=residual)
    assert new_residual is residual
    assert_exact(residual, expected_sum)
    ref_out, _ = rms_norm_ref(x, weight, EPS, residual=ref_residual)
    assert torch.equal(ref_residual, expected_sum)
    assert_close(out, ref_out, dtype)
    assert_close(out, rms_norm_fp64(expected_sum, weight), dtype)


def test_rms_norm_strided_rows_and_out():
    # x rows spaced apart (a slice of a wider buffer); out written in place of x
    wide = randn(9, 300, dtype=torch.float32, seed=5)
    x = wide[:, :200]
    weight = randn(200, dtype=torch.float32, seed=6)
    expected = rms_norm_ref(x, weight, EPS)
    out = rms_norm(x, weight, EPS, out=x)
    assert out is x
    assert_close(wide[:, :200], expected, torch.float32)
    assert torch.equal(wide[:, 200:], randn(9, 300, dtype=torch.float32, seed=5)[:, 200:])


def partials_and_weight(splits, num_tokens, hidden, dtype):
    """fp32 split-K partials [splits, num_tokens, hidden] of a matmul whose product is about
    unit scale, and an RMSNorm weight in dtype."""
    partials = randn(splits, num_tokens, hidden, dtype=torch.float32, seed=splits) / splits**0.5
    return partials, 1 + 0.1 * randn(hidden, dtype=dtype, seed=12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_rms_norm_sums_split_k_partials(splits, dtype):
    num_tokens, hidden = 9, 200
    partials, weight = partials_and_weight(splits, num_tokens, hidden, dtype)
    out = rms_norm(partials, weight, EPS)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    # the row normalized is the partials' sum rounded to dtype
    x = round_like_kernel(sum_partials(partials), dtype)
    assert torch.equal(out, rms_norm(x, weight, EPS))
    assert_close(out, rms_norm_ref(partials.sum(0).to(dtype), weight, EPS), dtype)
    assert_close(out, rms_norm_fp64(partials.sum(0), weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_rms_norm_partials_add_residual_in_place(splits, dtype):
    num_tokens, hidden = 9, 200
    partials, weight = partials_and_weight(splits, num_tokens, hidden, dtype)
    residual = randn(num_tokens, hidden, dtype=dtype, seed=13)
    plain_residual, ref_residual = residual.clone(), residual.clone()
    x = round_like_kernel(sum_partials(partials), dtype)
    expected_sum = x + residual  # the model's round(x @ w^T) + residual, rounded in dtype
    out = torch.full_like(residual, float("nan"))
    result_out, result_residual = rms_norm(partials, weight, EPS, residual=residual, out=out)
    assert result_out is out and result_residual is residual
    assert_exact(residual, expected_sum)
    plain_out, _ = rms_norm(x, weight, EPS, residual=plain_residual)
    assert torch.equal(residual, plain_residual)
    assert torch.equal(out, plain_out)
    ref_out, _ = rms_norm_ref(partials.sum(0).to(dtype), weight, EPS, residual=ref_residual)
    assert_close(residual, ref_residual, dtype)
    assert_close(out, ref_out, dtype)
    assert_close(out, rms_norm_fp64(expected_sum, weight), dtype)


def test_rms_norm_partials_with_strided_rows():
    # partials a slice of a wider buffer: each split's rows spaced apart
    wide = randn(2, 5, 300, dtype=torch.float32, seed=14)
    partials = wide[:, :, 50:250]
    weight = randn(200, dtype=torch.bfloat16, seed=15)
    out = rms_norm(partials, weight, EPS)
    x = round_like_kernel(sum_partials(partials), torch.bfloat16)
    assert torch.equal(out, rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_ref_matches_llama_module(dtype):
    hidden = 200
    module = RMSNorm(hidden, EPS)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=torch.Generator()))
    module = module.to(dtype)
    x = randn(41, hidden, dtype=dtype, seed=7).cpu()
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(rms_norm_ref(x, module.weight, EPS), expected)
        out = rms_norm(x.to(DEVICE), module.weight.to(DEVICE), EPS)
    if dtype == torch.float32:
        assert_close(out, expected, dtype)


def test_rms_norm_partials_reject_bad_input():
    partials = torch.randn(3, 4, 64, device=DEVICE)
    weight = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="partials must be float32"):
            rms_norm(partials.to(dtype), weight, EPS)
    with pytest.raises(ValueError, match="at least one split"):
        rms_norm(partials[:0], weight, EPS)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(partials, weight[:32], EPS)
    # residual and out take weight's dtype, not the partials' fp32
    with pytest.raises(ValueError, match="residual must match dtype"):
        rms_norm(partials, weight, EPS, residual=torch.zeros(4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="residual must have shape"):
        rms_norm(partials, weight, EPS, residual=weight.expand(3, 64).contiguous())
    with pytest.raises(ValueError, match="out must match dtype"):
        rms_norm(partials, weight, EPS, out=torch.zeros(4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(partials.transpose(1, 2), weight[:4], EPS)


def llama_rope_cache(max_positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's tables: cos/sin of cat(freqs, freqs), fp32 [max_positions, head_dim]."""
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def rotary_fp64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, head_dim] (the gathered rows)
    xd, cd, sd = x.double(), cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    lo, hi = xd[..., :half], xd[..., half:]
    return torch.cat(
        (lo * cd[..., :half] - hi * sd[..., :half], hi * cd[..., half:] + lo * sd[..., half:]), -1
    )


def fused_qk(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed):
    """q, k as strided views of a fused [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]."""
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
    return qkv, q, k.view(num_tokens, num_kv_heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("num_tokens", [1, 9, 41])
def test_rotary_on_fused_qkv_views(num_tokens, head_dim, heads, dtype):
    num_heads, num_kv_heads = heads
    cos_cache, sin_cache = llama_rope_cache(4096, head_dim)
    qkv, q, k = fused_qk(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=num_tokens)
    assert not q.is_contiguous() or num_tokens == 1
    gen = torch.Generator().manual_seed(head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    original = qkv.clone()
    ref_qkv, ref_q, ref_k = fused_qk(
        num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed=num_tokens
    )
    rotary(q, k, positions, cos_cache, sin_cache)
    rotary_ref(ref_q, ref_k, positions, cos_cache, sin_cache)
    assert_close(qkv, ref_qkv, dtype)
    cos, sin = cos_cache[positions], sin_cache[positions]
    orig_q = original[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    orig_k = original[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
    assert_close(q, rotary_fp64(orig_q, cos, sin), dtype)
    assert_close(k, rotary_fp64(orig_k.view(num_tokens, num_kv_heads, head_dim), cos, sin), dtype)
    v_start = (num_heads + num_kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], original[:, v_start:])  # v untouched


def test_rotary_reads_both_halves_of_the_tables():
    # arbitrary tables (halves differ) and int32 positions: the general x*cos + rotate_half(x)*sin
    cos_cache = randn(64, 48, dtype=torch.float32, seed=8)
    sin_cache = randn(64, 48, dtype=torch.float32, seed=9)
    _, q, k = fused_qk(9, 3, 1, 48, torch.float32, seed=10)  # head_dim 48: half is not a pow2
    q0, k0 = q.clone(), k.clone()
    positions = torch.tensor([5, 63, 0, 17, 17, 2, 40, 1, 9], dtype=torch.int32, device=DEVICE)
    rotary(q, k, positions, cos_cache, sin_cache)
    cos, sin = cos_cache[positions.long()], sin_cache[positions.long()]
    assert_close(q, rotary_fp64(q0, cos, sin), torch.float32)
    assert_close(k, rotary_fp64(k0, cos, sin), torch.float32)


def silu_and_mul_fp64(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.double().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 200, 1500])
@pytest.mark.parametrize("num_tokens", [1, 9, 41])
def test_silu_and_mul(num_tokens, inter, dtype):
    x = 3 * randn(num_tokens, 2 * inter, dtype=dtype, seed=inter)
    out = silu_and_mul(x)
    assert out.shape == (num_tokens, inter) and out.dtype == dtype
    assert_close(out, silu_and_mul_ref(x), dtype)
    assert_close(out, silu_and_mul_fp64(x), dtype)


def test_silu_and_mul_strided_rows_into_out():
    wide = randn(9, 500, dtype=torch.bfloat16, seed=11)
    x = wide[:, :400]
    out = torch.empty(9, 200, dtype=torch.bfloat16, device=DEVICE)
    assert silu_and_mul(x, out=out) is out
    assert_close(out, silu_and_mul_ref(x), torch.bfloat16)


def test_zero_tokens():
    x = torch.empty(0, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    assert rms_norm(x, weight, EPS).shape == (0, 64)
    out, residual = rms_norm(x, weight, EPS, residual=torch.empty_like(x))
    assert out.shape == residual.shape == (0, 64)
    assert silu_and_mul(x).shape == (0, 32)
    cos_cache, sin_cache = llama_rope_cache(16, 32)
    q, k = torch.empty(0, 4, 32, device=DEVICE), torch.empty(0, 2, 32, device=DEVICE)
    rotary(q, k, torch.empty(0, dtype=torch.int64, device=DEVICE), cos_cache, sin_cache)


def test_bad_input_raises_value_error():
    x = torch.randn(3, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, weight[:32], EPS)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x, weight.half(), EPS)
    with pytest.raises(ValueError, match="weight must be on"):
        rms_norm(x, torch.ones(64, device="meta"), EPS)
    with pytest.raises(ValueError, match="residual must have shape"):
        rms_norm(x, weight, EPS, residual=x[:2])
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        rms_norm(x.long(), weight.long(), EPS)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(x.t(), weight[:3], EPS)

    cos_cache, sin_cache = llama_rope_cache(16, 32)
    q, k = torch.randn(3, 4, 32, device=DEVICE), torch.randn(3, 2, 32, device=DEVICE)
    positions = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="k must be"):
        rotary(q, k[:, :, :16], positions, cos_cache, sin_cache)
    with pytest.raises(ValueError, match="positions"):
        rotary(q, k, positions.float(), cos_cache, sin_cache)
    with pytest.raises(ValueError, match="positions"):
        rotary(q, k, positions[:2], cos_cache, sin_cache)
    with pytest.raises(ValueError, match="cos_cache"):
        rotary(q, k, positions, cos_cache.half(), sin_cache)
    with pytest.raises(ValueError, match="share dtype"):
        rotary(q, k.half(), positions, cos_cache, sin_cache)

    with pytest.raises(ValueError, match="odd width"):
        silu_and_mul(x[:, :63])
    with pytest.raises(ValueError, match="out must have shape"):
        silu_and_mul(x, out=torch.empty(3, 64, device=DEVICE))
