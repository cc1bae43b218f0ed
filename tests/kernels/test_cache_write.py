"""Cache write kernel: exact scatter through a slot mapping, int64 index math."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from paged_kv_data import DEVICE

from kernels import paged_decode, paged_decode_ref, write_kv, write_kv_ref
from kernels._common import kv_token_offset

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
