"""Paged prefill / extend kernel vs the torch reference and vs fp64 SDPA on contiguous KV."""

from __future__ import annotations

import pytest
import torch
from paged_kv_data import DEVICE, assert_close, make_paged_batch, sdpa_fp64

from kvmesh.kernels import paged_prefill, paged_prefill_ref

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_DTYPES = [pytest.param(d, marks=[gpu, needs_cuda]) for d in (torch.bfloat16, torch.float16)]

# (new tokens, total tokens): a fresh prompt, chunks over a cached prefix, a zero-length chunk
CHUNKS = [(9, 9), (41, 100), (0, 17), (1, 1), (341, 341), (5, 60)]


def _run(chunks, page_size, group, head_dim, dtype, num_kv_heads=2, seed=0, shuffle=True):
    q_lens = [c[0] for c in chunks]
    seq_lens = [c[1] for c in chunks]
    batch = make_paged_batch(seq_lens, page_size, num_kv_heads, head_dim, dtype, seed=seed,
                             shuffle=shuffle)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    q = q.to(DEVICE)
    scale = head_dim**-0.5
    out = paged_prefill(q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens,
                        scale)
    return batch, cu, q, scale, out


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page_size", [16, 32])
def test_prefill_matches_reference_and_sdpa(group, page_size):
    batch, cu, q, scale, out = _run(CHUNKS, page_size, group, 32, torch.float32)
    ref = paged_prefill_ref(q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens,
                            scale)
    assert_close(out, ref, torch.float32)
    for i in range(len(CHUNKS)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        exact = sdpa_fp64(q[rows], batch.keys[i], batch.values[i], scale)
        assert_close(out[rows], exact, torch.float32)


def test_prefill_head_dim_64_odd_chunks():
    chunks = [(341, 400), (9, 9), (41, 41)]
    batch, cu, q, scale, out = _run(chunks, 16, 4, 64, torch.float32, seed=4)
    ref = paged_prefill_ref(q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens,
                            scale)
    assert_close(out, ref, torch.float32)


def test_prefill_scattered_equals_contiguous():
    outs = [_run(CHUNKS, 16, 4, 32, torch.float32, seed=2, shuffle=s)[-1] for s in (False, True)]
    assert torch.equal(outs[0], outs[1])


def test_prefill_all_chunks_empty():
    out = _run([(0, 5), (0, 30)], 16, 2, 32, torch.float32)[-1]
    assert out.shape == (0, 4, 32)


def test_prefill_rejects_bad_cu_seqlens():
    b = make_paged_batch([9, 20], 16, 2, 32, torch.float32)
    q = torch.randn(29, 4, 32, device=DEVICE)
    cu = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)  # needs num_seqs + 1 entries
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill(q, b.kv_pool, b.layer, b.page_table, cu, b.seq_lens, 0.1)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_gpu(dtype, group, head_dim):
    chunks = [*CHUNKS, (1000, 3000), (2048, 2048), (77, 4099)]
    batch, cu, q, scale, out = _run(chunks, 16, group, head_dim, dtype, num_kv_heads=8)
    ref = paged_prefill_ref(q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens,
                            scale)
    assert_close(out, ref, dtype)
