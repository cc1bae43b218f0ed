"""Sliding-window attention (Mistral; Qwen2 with use_sliding_window): the paged kernels vs their
torch references, the references vs a dense fp64 SDPA whose mask is transformers' own formula.

Every key before the earliest query's window is NaN in the pool, so a kernel or reference that
reads a page (or key) it should skip turns its output into NaN. Windows: smaller than a page,
one page, several pages, longer than every sequence.
"""

from __future__ import annotations

import pytest
import torch
from paged_kv_data import (
    DEVICE,
    assert_close,
    make_paged_batch,
    poison_before,
    sdpa_fp64,
    window_mask,
)

from kvmesh.kernels import (
    DecodeConfig,
    paged_decode,
    paged_decode_ref,
    paged_prefill,
    paged_prefill_ref,
)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_DTYPES = [pytest.param(d, marks=[gpu, needs_cuda]) for d in (torch.bfloat16, torch.float16)]

PAGE_SIZE = 16
# 80: several pages, and more than a key tile (64), so a prefill key block can lie before a
# query block's diagonal yet reach back past its later rows' windows
WINDOWS = [1, 7, 16, 23, 80, 1000]
DECODE_LENS = [1, 9, 41, 130]
# (new tokens, total tokens): a fresh prompt, chunks over a cached prefix, a zero-length chunk
CHUNKS = [(9, 9), (41, 100), (0, 17), (1, 1), (70, 130), (5, 60), (33, 33), (100, 300)]


def _decode_batch(seq_lens, window, num_kv_heads, group, head_dim=32, dtype=torch.float32,
                  page_size=PAGE_SIZE):
    batch = make_paged_batch(seq_lens, page_size, num_kv_heads, head_dim, dtype, seed=window)
    poison_before(batch, [max(n - window, 0) for n in seq_lens])
    gen = torch.Generator().manual_seed(window + 1)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    return batch, q.to(DEVICE)


def _prefill_batch(chunks, window, num_kv_heads, group, head_dim=32, dtype=torch.float32):
    seq_lens = [total for _, total in chunks]
    batch = make_paged_batch(seq_lens, PAGE_SIZE, num_kv_heads, head_dim, dtype, seed=window)
    poison_before(batch, [max(total - new - window + 1, 0) for new, total in chunks])
    q_lens = torch.tensor([new for new, _ in chunks])
    cu = torch.tensor([0, *q_lens.cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(window + 1)
    q = torch.randn(int(q_lens.sum()), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    return batch, cu, q.to(DEVICE)


def test_window_mask_is_transformers_formula():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    for window in (1, 3, 5, 9):
        hf = masking_utils.sliding_window_causal_mask_function(window)
        num_q, seq_len = 6, 11
        # transformers evaluates it on index tensors (batch, head, query position, key position)
        q_pos = torch.arange(seq_len - num_q, seq_len)[:, None]
        expected = hf(torch.tensor(0), torch.tensor(0), q_pos, torch.arange(seq_len)[None, :])
        assert torch.equal(window_mask(num_q, seq_len, window), expected)


@pytest.mark.parametrize("window", WINDOWS)
def test_references_match_dense_sdpa(window):
    batch, q = _decode_batch(DECODE_LENS, window, 3, 3)
    out = paged_decode_ref(q, batch.kv_pool, batch.layer, batch.page_table, batch.seq_lens, 0.2,
                           sliding_window=window)
    for i in range(len(DECODE_LENS)):
        exact = sdpa_fp64(q[i : i + 1], batch.keys[i], batch.values[i], 0.2, window)[0]
        assert_close(out[i], exact, torch.float32)
    batch, cu, q = _prefill_batch(CHUNKS, window, 3, 3)
    out = paged_prefill_ref(q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens,
                            0.2, sliding_window=window)
    for i in range(len(CHUNKS)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        exact = sdpa_fp64(q[rows], batch.keys[i], batch.values[i], 0.2, window)
        assert_close(out[rows], exact, torch.float32)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kernel_matches_reference(window, num_splits):
    # 3 KV heads of 3 query heads each; 3 splits of the window leave some splits empty
    batch, q = _decode_batch(DECODE_LENS, window, 3, 3)
    args = (q, batch.kv_pool, batch.layer, batch.page_table, batch.seq_lens, 0.2)
    out = paged_decode(*args, num_splits=num_splits, sliding_window=window)
    assert_close(out, paged_decode_ref(*args, sliding_window=window), torch.float32)


@pytest.mark.parametrize("num_splits", [None, 5])
def test_decode_kernel_window_several_heads_a_program(num_splits):
    # two KV heads a program (their columns interleave in one tile); None: the launcher picks
    # the splits from the lengths capped at the window
    batch, q = _decode_batch([200, 3, 77], 23, 2, 3)
    args = (q, batch.kv_pool, batch.layer, batch.page_table, batch.seq_lens, 0.2)
    out = paged_decode(*args, num_splits=num_splits, config=DecodeConfig(block_n=16, kv_heads=2),
                       sliding_window=23)
    assert_close(out, paged_decode_ref(*args, sliding_window=23), torch.float32)


@pytest.mark.parametrize("window", WINDOWS)
def test_prefill_kernel_matches_reference(window):
    batch, cu, q = _prefill_batch(CHUNKS, window, 3, 3)
    args = (q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens, 0.2)
    out = paged_prefill(*args, sliding_window=window)
    assert_close(out, paged_prefill_ref(*args, sliding_window=window), torch.float32)


def test_window_past_every_sequence_equals_full_attention():
    # a window no sequence outgrows reads the same keys in the same tiles as no window
    window = max(total for _, total in CHUNKS)
    batch, q = _decode_batch(DECODE_LENS, window, 2, 4)
    args = (q, batch.kv_pool, batch.layer, batch.page_table, batch.seq_lens, 0.2)
    assert torch.equal(paged_decode(*args, num_splits=3, sliding_window=window),
                       paged_decode(*args, num_splits=3))
    assert torch.equal(paged_decode_ref(*args, sliding_window=window), paged_decode_ref(*args))
    batch, cu, q = _prefill_batch(CHUNKS, window, 2, 4)
    args = (q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens, 0.2)
    assert torch.equal(paged_prefill(*args, sliding_window=window), paged_prefill(*args))
    assert torch.equal(paged_prefill_ref(*args, sliding_window=window), paged_prefill_ref(*args))


@pytest.mark.parametrize("window", [0, -4, 2.5, True])
def test_bad_window_rejected(window):
    batch, cu, q = _prefill_batch([(9, 9)], 9, 2, 2)
    decode_args = (q[:1], batch.kv_pool, batch.layer, batch.page_table, batch.seq_lens, 0.2)
    prefill_args = (q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens, 0.2)
    for fn, args in ((paged_decode, decode_args), (paged_decode_ref, decode_args),
                     (paged_prefill, prefill_args), (paged_prefill_ref, prefill_args)):
        with pytest.raises(ValueError, match="sliding_window"):
            fn(*args, sliding_window=window)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("window", [100, 4096])
def test_sliding_window_gpu(dtype, window):
    seq_lens = [1, 9, 341, 4099, 9000, 16]
    batch, q = _decode_batch(seq_lens, window, 8, 4, head_dim=128, dtype=dtype)
    args = (q, batch.kv_pool, batch.layer, batch.page_table, batch.seq_lens, 0.09)
    out = paged_decode(*args, sliding_window=window)
    assert_close(out, paged_decode_ref(*args, sliding_window=window), dtype)
    chunks = [*CHUNKS, (1000, 3000), (2048, 2048), (77, 4099)]
    batch, cu, q = _prefill_batch(chunks, window, 8, 4, head_dim=128, dtype=dtype)
    args = (q, batch.kv_pool, batch.layer, batch.page_table, cu, batch.seq_lens, 0.09)
    out = paged_prefill(*args, sliding_window=window)
    assert_close(out, paged_prefill_ref(*args, sliding_window=window), dtype)
