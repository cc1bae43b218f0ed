"""Cache write kernels: exact scatter through a slot mapping, int64 index math; RoPE and the
cache write of a fused q/k/v projection (`rope_write_kv`) vs its unfused torch and Triton chains,
with and without Qwen3's per-head q/k RMSNorm before RoPE."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from paged_kv_data import DEVICE, TOLERANCE, round_like_kernel, sum_partials

from kvmesh.kernels import (
    paged_decode,
    paged_decode_ref,
    rms_norm_ref,
    rotary,
    rotary_ref,
    write_kv,
    write_kv_ref,
)
from kvmesh.kernels._common import kv_token_offset
from kvmesh.kernels.cache_write import rope_write_kv

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("num_tokens", [1, 9, 41, 341])
@pytest.mark.parametrize("page_size", [16, 32])
def test_write_kv_scatters_exactly(num_tokens, page_size):
    gen = torch.Generator().manual_seed(num_tokens)
    num_pages, num_kv_heads, head_dim = 24, 3, 32
    pool = torch.randn(num_pages, 2, 2, page_size, num_kv_heads, head_dim, generator=gen)
    pool = pool.to(DEVICE)
    expected = pool.clone()
    # k, v as strided views of a fused qkv projection, as the model produces them
    qkv = torch.randn(num_tokens, 5 * num_kv_heads, head_dim, generator=gen).to(DEVICE)
    k, v = qkv[:, 3 * num_kv_heads : 4 * num_kv_heads], qkv[:, 4 * num_kv_heads :]
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens].to(DEVICE)
    write_kv(pool, 1, k, v, slots)
    write_kv_ref(expected, 1, k, v, slots)
    assert torch.equal(pool, expected)
    page, offset = divmod(int(slots[0]), page_size)
    assert torch.equal(pool[page, 1, 0, offset], k[0])  # exact copy, other layer untouched
    assert torch.equal(pool[:, 0], expected[:, 0])


def test_write_kv_rejects_bad_input():
    pool = torch.zeros(4, 1, 2, 16, 2, 32, device=DEVICE)
    k = torch.randn(3, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="int64"):
        write_kv(pool, 0, k, k, torch.arange(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="does not match"):
        write_kv(pool, 0, k[:, :1], k[:, :1], torch.arange(3, device=DEVICE))
    with pytest.raises(ValueError, match="layer"):
        write_kv(pool, 1, k, k, torch.arange(3, device=DEVICE))


@triton.jit
def _offset_probe_kernel(page_ids_ptr, tokens_ptr, out_ptr, stride_page, stride_token,
                         BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    page_id = tl.load(page_ids_ptr + idx)  # int32, like the page table
    token = tl.load(tokens_ptr + idx)
    tl.store(out_ptr + idx, kv_token_offset(page_id, token, stride_page, stride_token))


def test_index_math_does_not_wrap_past_int32():
    # a bf16 pool of 120k pages x 28 layers x 2 x 16 x 8 x 128 has 2^36 elements
    stride_token = 8 * 128
    stride_page = 28 * 2 * 16 * stride_token
    page_ids = torch.tensor([0, 1, 70_000, 119_999, 2**31 - 1, 5, 6, 7], dtype=torch.int32)
    tokens = torch.tensor([0, 15, 3, 15, 1, 0, 0, 0], dtype=torch.int32)
    out = torch.empty(8, dtype=torch.int64, device=DEVICE)
    _offset_probe_kernel[(1,)](page_ids.to(DEVICE), tokens.to(DEVICE), out, stride_page,
                               stride_token, BLOCK=8)
    expected = [p * stride_page + t * stride_token for p, t in zip(page_ids.tolist(),
                                                                 tokens.tolist(), strict=True)]
    assert out.cpu().tolist() == expected
    assert max(expected) > 2**40


@gpu
@needs_cuda
def test_pool_over_2_pow_31_elements():
    # 66,000 pages x 2 x 16 x 8 x 128 bf16 = 2.16e9 elements (4.3 GB): the last pages sit past
    # element 2^31, so int32 offsets would land in the wrong place or fault
    num_pages, page_size, num_kv_heads, head_dim = 66_000, 16, 8, 128
    pool = torch.empty(num_pages, 1, 2, page_size, num_kv_heads, head_dim, dtype=torch.bfloat16,
                       device="cuda")
    assert pool.numel() > 2**31
    seq_len = 5 * page_size - 3
    pages = torch.arange(num_pages - 5, num_pages, device="cuda")
    slots = (pages[:, None] * page_size + torch.arange(page_size, device="cuda")).flatten()
    slots = slots[:seq_len]
    k = torch.randn(seq_len, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    write_kv(pool, 0, k, v, slots)
    assert torch.equal(pool[pages, 0, 0].flatten(0, 1)[:seq_len], k)
    page_table = pages.to(torch.int32)[None]
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 32, head_dim, device="cuda", dtype=torch.bfloat16)
    out = paged_decode(q, pool, 0, page_table, seq_lens, 0.088)
    ref = paged_decode_ref(q, pool, 0, page_table, seq_lens, 0.088)
    torch.testing.assert_close(out.float(), ref.float(), atol=1.6e-2, rtol=5e-2)


# ---- rope_write_kv ----------------------------------------------------------------------------

# (num_heads, num_kv_heads, head_dim): GQA groups of 3 and 1; head_dim 48 has a half of 24, no
# power of two
ROPE_HEADS = [(6, 2, 16), (5, 5, 32), (3, 1, 48)]
ROPE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAGE_SIZE = 16
MAX_POSITIONS = 64


def assert_rope_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same math, so exact in the interpreter but for its bf16 rounding (towards zero: one ulp);
    on the GPU fp32 products may be contracted into FMAs, which can move a result by an ulp."""
    rtol = {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 2**-7}[actual.dtype]
    atol = 0.0
    if DEVICE != "cpu":
        atol = 1e-5
        rtol = max(rtol, {torch.float32: 1e-5, torch.float16: 2**-10}.get(actual.dtype, 0.0))
    # NaN where the pool was poisoned and must stay so
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=0.0, rtol=0.0, equal_nan=True)


def rope_inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, splits, seed):
    """qkv ([num_tokens, width] in dtype, or fp32 [splits, num_tokens, width] partials of about
    unit sum), positions, random cos/sin tables (halves differ, so both are read), a two-layer
    pool poisoned with NaN and distinct random slots in it."""
    gen = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if splits:
        qkv = torch.randn(splits, num_tokens, width, generator=gen) / splits**0.5
    else:
        qkv = torch.randn(num_tokens, width, generator=gen).to(dtype)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    cos_cache = torch.randn(MAX_POSITIONS, head_dim, generator=gen)
    sin_cache = torch.randn(MAX_POSITIONS, head_dim, generator=gen)
    num_pages = num_tokens // PAGE_SIZE + 3
    pool = torch.full((num_pages, 2, 2, PAGE_SIZE, num_kv_heads, head_dim), float("nan"),
                      dtype=dtype)
    slots = torch.randperm(num_pages * PAGE_SIZE, generator=gen)[:num_tokens]
    return [t.to(DEVICE) for t in (qkv, positions, cos_cache, sin_cache, pool, slots)]


def split_qkv(qkv, num_heads, num_kv_heads, head_dim, dtype):
    """q, k, v [num_tokens, heads, head_dim] (copies) of the projection the kernel sees: qkv, or
    the sum of its partials rounded to dtype."""
    if qkv.dim() == 3:
        qkv = round_like_kernel(sum_partials(qkv), dtype)
    heads = qkv.view(qkv.shape[0], -1, head_dim).split([num_heads, num_kv_heads, num_kv_heads], 1)
    return [t.clone() for t in heads]


@pytest.mark.parametrize("dtype", ROPE_DTYPES)
@pytest.mark.parametrize("splits", [None, 1, 3], ids=["plain", "partials1", "partials3"])
@pytest.mark.parametrize("heads", ROPE_HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
@pytest.mark.parametrize("num_tokens", [1, 19])
def test_rope_write_kv_matches_unfused_chain(num_tokens, heads, splits, dtype):
    num_heads, num_kv_heads, head_dim = heads
    qkv, positions, cos_cache, sin_cache, pool, slots = rope_inputs(
        num_tokens, *heads, dtype, splits, seed=num_tokens)
    torch_pool, triton_pool = pool.clone(), pool.clone()
    q = rope_write_kv(qkv, positions, cos_cache, sin_cache, pool, 1, slots, num_heads)
    assert q.shape == (num_tokens, num_heads, head_dim) and q.dtype == dtype

    # torch: rotary_ref on q and k, then write_kv_ref
    ref_q, ref_k, ref_v = split_qkv(qkv, *heads, dtype)
    rotary_ref(ref_q, ref_k, positions, cos_cache, sin_cache)
    write_kv_ref(torch_pool, 1, ref_k, ref_v, slots)
    assert_rope_close(q, ref_q)
    assert_rope_close(pool, torch_pool)  # written slots, and NaN everywhere else

    # the Triton kernels it fuses: the same fp32 math, so the same bits here
    tri_q, tri_k, tri_v = split_qkv(qkv, *heads, dtype)
    rotary(tri_q, tri_k, positions, cos_cache, sin_cache)
    write_kv(triton_pool, 1, tri_k, tri_v, slots)
    if DEVICE == "cpu":
        assert_bitwise_equal(q, tri_q)
        assert_bitwise_equal(pool, triton_pool)
    else:
        assert_rope_close(q, tri_q)
        assert_rope_close(pool, triton_pool)
    # v is copied, not rotated: bit-exact, and layer 0 is never touched
    assert_bitwise_equal(pool[:, 1, 1], torch_pool[:, 1, 1])
    assert pool[:, 0].isnan().all()


def test_rope_write_kv_strided_qkv_into_out():
    # qkv and partials rows spaced apart (slices of wider buffers); q written into a slice of a
    # wider buffer; int32 positions
    num_heads, num_kv_heads, head_dim = 6, 2, 16
    width = (num_heads + 2 * num_kv_heads) * head_dim
    for splits in (None, 3):
        wide, positions, cos_cache, sin_cache, pool, slots = rope_inputs(
            9, num_heads, num_kv_heads, head_dim, torch.bfloat16, splits, seed=21)
        wide = torch.cat((wide, wide[..., :24]), -1)
        qkv = wide[..., 24:24 + width]
        buffer = torch.full((9, num_heads + 1, head_dim), float("nan"), dtype=torch.bfloat16,
                            device=DEVICE)
        out = buffer[:, 1:]
        ref_pool = pool.clone()
        q = rope_write_kv(qkv, positions.int(), cos_cache, sin_cache, pool, 1, slots, num_heads,
                          out=out)
        assert q is out
        assert buffer[:, 0].isnan().all()
        ref_q, ref_k, ref_v = split_qkv(qkv, num_heads, num_kv_heads, head_dim, torch.bfloat16)
        rotary_ref(ref_q, ref_k, positions, cos_cache, sin_cache)
        write_kv_ref(ref_pool, 1, ref_k, ref_v, slots)
        assert_rope_close(q, ref_q)
        assert_rope_close(pool, ref_pool)


def test_rope_write_kv_zero_tokens():
    qkv, positions, cos_cache, sin_cache, pool, slots = rope_inputs(
        0, 6, 2, 16, torch.float32, None, seed=0)
    q = rope_write_kv(qkv, positions, cos_cache, sin_cache, pool, 1, slots, 6)
    assert q.shape == (0, 6, 16)
    assert pool.isnan().all()


def test_rope_write_kv_rejects_bad_input():
    num_heads = 6
    qkv, positions, cos_cache, sin_cache, pool, slots = rope_inputs(
        5, num_heads, 2, 16, torch.bfloat16, None, seed=0)
    partials = torch.zeros(3, *qkv.shape, device=DEVICE)

    def call(qkv=qkv, positions=positions, cos_cache=cos_cache, layer=1, slots=slots, out=None):
        rope_write_kv(qkv, positions, cos_cache, sin_cache, pool, layer, slots, num_heads, out)

    with pytest.raises(ValueError, match="qkv must be"):
        call(qkv=qkv[:, :-16])  # one head short
    with pytest.raises(ValueError, match="qkv must be"):
        call(qkv=partials[..., :-16])
    with pytest.raises(ValueError, match="qkv must be"):
        call(qkv=partials.bfloat16())  # partials are fp32
    with pytest.raises(ValueError, match="qkv must be"):
        call(qkv=qkv.float())  # a plain projection is in the pool's dtype
    with pytest.raises(ValueError, match="qkv must be"):
        call(qkv=qkv[None, None])
    with pytest.raises(ValueError, match="contiguous"):
        call(qkv=qkv.t().contiguous().t())
    with pytest.raises(ValueError, match="slot_mapping"):
        call(slots=slots.int())
    with pytest.raises(ValueError, match="slot_mapping"):
        call(slots=slots[:4])
    with pytest.raises(ValueError, match="positions"):
        call(positions=positions.float())
    with pytest.raises(ValueError, match="positions"):
        call(positions=positions[:4])
    with pytest.raises(ValueError, match="cos_cache"):
        call(cos_cache=cos_cache.half())
    with pytest.raises(ValueError, match="cos_cache"):
        call(cos_cache=cos_cache[:, :8])
    with pytest.raises(ValueError, match="layer"):
        call(layer=2)
    with pytest.raises(ValueError, match="out must be"):
        call(out=torch.empty(5, num_heads, 16, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        call(out=torch.empty(5, num_heads - 1, 16, dtype=torch.bfloat16, device=DEVICE))
    assert pool.isnan().all()  # no rejected call wrote


# ---- rope_write_kv with Qwen3's per-head q/k RMSNorm ------------------------------------------


def rope_tables_of(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real NeoX cos/sin tables [MAX_POSITIONS, head_dim] (theta 10^6, as Qwen3): |cos|, |sin|
    <= 1, so the rotation does not magnify the norm's last-ulp rounding differences."""
    inv_freq = 1e6 ** -(torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(MAX_POSITIONS).float()[:, None] * inv_freq[None]
    angles = torch.cat((angles, angles), -1)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def qk_norm_weights(head_dim: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """q's and k's [head_dim] weights: different, far from 1, so a swap or a skip shows."""
    gen = torch.Generator().manual_seed(seed)
    return [(0.5 + 1.5 * torch.rand(head_dim, generator=gen)).to(dtype).to(DEVICE)
            for _ in range(2)]


NORM_EPS = 0.1  # against unit-variance heads, large enough that a missing eps shows


def rms_norm_heads_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rms_norm_ref (transformers' RMSNorm) of each head of x [num_tokens, heads, head_dim],
    with its two roundings to dtype done as a kernel's `.to(dtype)` does them (so the
    interpreter's bf16 truncation is not amplified by the rotation that follows)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    normed = round_like_kernel(rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + NORM_EPS),
                               x.dtype)
    return round_like_kernel(weight.float() * normed.float(), x.dtype).view(x.shape)


def assert_norm_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Per-dtype tolerance of the kernel tests: the norm's fp32 sum and rsqrt may differ from
    torch's in the last bit, which can move a rounding to dtype by an ulp."""
    atol, rtol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("dtype", ROPE_DTYPES)
@pytest.mark.parametrize("splits", [None, 3], ids=["plain", "partials3"])
@pytest.mark.parametrize("heads", ROPE_HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
@pytest.mark.parametrize("num_tokens", [1, 19])
def test_rope_write_kv_with_qk_norm_matches_norm_rotary_write(num_tokens, heads, splits, dtype):
    num_heads, num_kv_heads, head_dim = heads
    qkv, positions, _, _, pool, slots = rope_inputs(num_tokens, *heads, dtype, splits,
                                                    seed=num_tokens + 7)
    cos_cache, sin_cache = rope_tables_of(head_dim)
    q_weight, k_weight = qk_norm_weights(head_dim, dtype, seed=head_dim)
    ref_pool, plain_pool = pool.clone(), pool.clone()
    q = rope_write_kv(qkv, positions, cos_cache, sin_cache, pool, 1, slots, num_heads,
                      q_norm_weight=q_weight, k_norm_weight=k_weight, norm_eps=NORM_EPS)

    # torch: RMSNorm of each head (rows of [tokens * heads, head_dim]), RoPE, cache write
    ref_q, ref_k, ref_v = split_qkv(qkv, *heads, dtype)
    if dtype != torch.bfloat16 or DEVICE != "cpu":  # rounds to nearest: rms_norm_ref's bits
        rows = ref_q.reshape(-1, head_dim)
        assert torch.equal(rms_norm_heads_ref(ref_q, q_weight),
                           rms_norm_ref(rows, q_weight, NORM_EPS).view(ref_q.shape))
    ref_q, ref_k = rms_norm_heads_ref(ref_q, q_weight), rms_norm_heads_ref(ref_k, k_weight)
    rotary_ref(ref_q, ref_k, positions, cos_cache, sin_cache)
    write_kv_ref(ref_pool, 1, ref_k, ref_v, slots)
    assert_norm_close(q, ref_q)
    assert_norm_close(pool, ref_pool)  # written slots, and NaN everywhere else
    assert_bitwise_equal(pool[:, 1, 1], ref_pool[:, 1, 1])  # v is neither normed nor rotated
    assert pool[:, 0].isnan().all()

    # the norm is what changed q and k: without it they are the plain rotation
    plain_q = rope_write_kv(qkv, positions, cos_cache, sin_cache, plain_pool, 1, slots,
                            num_heads)
    assert not torch.allclose(plain_q.float(), q.float(), atol=0.1)
    assert not torch.allclose(plain_pool[:, 1, 0].nan_to_num().float(),
                              pool[:, 1, 0].nan_to_num().float(), atol=0.1)


def test_rope_write_kv_rejects_bad_qk_norm():
    num_heads, head_dim = 6, 16
    qkv, positions, cos_cache, sin_cache, pool, slots = rope_inputs(
        5, num_heads, 2, head_dim, torch.bfloat16, None, seed=0)
    weight = torch.ones(head_dim, dtype=torch.bfloat16, device=DEVICE)

    def call(q_weight=weight, k_weight=weight, eps=1e-6):
        rope_write_kv(qkv, positions, cos_cache, sin_cache, pool, 1, slots, num_heads,
                      q_norm_weight=q_weight, k_norm_weight=k_weight, norm_eps=eps)

    with pytest.raises(ValueError, match="both or neither"):
        call(k_weight=None)
    with pytest.raises(ValueError, match="q_norm_weight must be"):
        call(q_weight=weight.float())  # not the pool's dtype
    with pytest.raises(ValueError, match="k_norm_weight must be"):
        call(k_weight=weight[:-2])
    with pytest.raises(ValueError, match="k_norm_weight must be"):
        call(k_weight=torch.ones(2 * head_dim, dtype=torch.bfloat16, device=DEVICE)[::2])
    with pytest.raises(ValueError, match="norm_eps"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="norm_eps"):
        call(eps=float("nan"))
    assert pool.isnan().all()  # no rejected call wrote
