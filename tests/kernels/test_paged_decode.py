"""Paged decode kernel vs the torch reference and vs fp64 SDPA on contiguous KV."""

from __future__ import annotations

import pytest
import torch
from paged_kv_data import DEVICE, assert_close, make_paged_batch, sdpa_fp64

from kvmesh.kernels import (
    DecodeConfig,
    DecodeWorkspace,
    num_kv_splits,
    paged_decode,
    paged_decode_ref,
)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_DTYPES = [pytest.param(d, marks=[gpu, needs_cuda]) for d in (torch.bfloat16, torch.float16)]


def _run(seq_lens, page_size, group, head_dim, dtype, num_kv_heads=2, num_splits=None, seed=0,
         config=None):
    batch = make_paged_batch(seq_lens, page_size, num_kv_heads, head_dim, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    q = q.to(DEVICE)
    scale = head_dim**-0.5
    out = paged_decode(q, batch.kv_pool, batch.layer, batch.page_table, batch.seq_lens, scale,
                       num_splits=num_splits, config=config)
    ref = paged_decode_ref(q, batch.kv_pool, batch.layer, batch.page_table, batch.seq_lens, scale)
    return batch, q, scale, out, ref


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page_size", [16, 32])
def test_decode_matches_reference_and_sdpa(group, page_size):
    seq_lens = [1, 9, 41, 341]
    batch, q, scale, out, ref = _run(seq_lens, page_size, group, 32, torch.float32)
    assert_close(out, ref, torch.float32)
    for i in range(len(seq_lens)):
        exact = sdpa_fp64(q[i : i + 1], batch.keys[i], batch.values[i], scale)[0]
        assert_close(out[i], exact, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 7, 12, 40])
def test_decode_split_counts_agree(num_splits):
    # 7+ splits of 64-token blocks over 9..341 tokens leave some splits empty; 12 and 40 merge
    # in several chunks
    _, _, _, out, ref = _run([9, 341, 130], 16, 4, 64, torch.float32, num_splits=num_splits)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("num_kv_heads, group", [(6, 3), (8, 1), (4, 4)])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_decode_heads_per_program(kv_heads, num_kv_heads, group, num_splits):
    # several KV heads a program: a query row must score only its own head's columns; with 6
    # KV heads, 4 or 8 a program fall back to 2 (their gcd)
    config = DecodeConfig(block_n=16, kv_heads=kv_heads)
    _, _, _, out, ref = _run([1, 9, 41, 200], 16, group, 32, torch.float32,
                             num_kv_heads=num_kv_heads, num_splits=num_splits, config=config)
    assert_close(out, ref, torch.float32)


def test_decode_config_per_head_dim():
    assert DecodeConfig.for_head_dim(64) == DecodeConfig(block_n=32, kv_heads=2)
    assert DecodeConfig.for_head_dim(128) == DecodeConfig()
    assert DecodeConfig(kv_heads=2).kv_blocks(8) == 4
    assert DecodeConfig(kv_heads=4).kv_blocks(6) == 3  # gcd(4, 6) = 2 heads a program
    assert DecodeConfig(kv_heads=8).kv_blocks(1) == 1
    with pytest.raises(ValueError):
        DecodeConfig(kv_heads=3)


def test_scattered_pages_equal_contiguous_pages():
    seq_lens = [41, 341, 1]
    args = (seq_lens, 16, 2, 32, torch.float32)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 8, 32, generator=gen).to(DEVICE)
    outs = []
    for shuffle in (False, True):
        b = make_paged_batch(*args, shuffle=shuffle, seed=3)
        outs.append(paged_decode(q, b.kv_pool, b.layer, b.page_table, b.seq_lens, 0.17,
                                 num_splits=3))
    assert torch.equal(outs[0], outs[1])


def test_num_kv_splits_fills_one_wave():
    # 132 SMs x 3 resident programs = 396 slots
    assert num_kv_splits(8, 8, 32768, num_sms=132) == 6  # 64 programs -> 384
    assert num_kv_splits(16, 8, 4096, num_sms=132) == 3  # 128 programs -> 384
    assert num_kv_splits(128, 8, 1024, num_sms=132) == 1  # 1024 programs: several waves
    assert num_kv_splits(49, 8, 8192, num_sms=132) == 1  # 392 programs: one wave already
    assert num_kv_splits(1, 8, 300, num_sms=132) == 5  # never below 64 tokens per split
    assert num_kv_splits(1, 1, 10**6, num_sms=132) == 64  # capped at MAX_SPLITS
    # varlen: 16 sequences holding as many tokens as 9 of the longest -> 72 programs
    assert num_kv_splits(16, 8, 8000, num_sms=132, total_tokens=66_000) == 5
    assert num_kv_splits(16, 8, 8000, num_sms=132, total_tokens=16 * 8000) == 3  # uniform


@pytest.mark.parametrize(
    "bad",
    ["dtype", "gqa", "table_dtype", "splits", "workspace"],
)
def test_decode_rejects_bad_input(bad):
    b = make_paged_batch([9], 16, 2, 32, torch.float32)
    q = torch.randn(1, 4, 32, device=DEVICE)
    kwargs = {}
    page_table, seq_lens = b.page_table, b.seq_lens
    if bad == "dtype":
        q = q.double()
    elif bad == "gqa":
        q = torch.randn(1, 3, 32, device=DEVICE)
    elif bad == "table_dtype":
        page_table = page_table.long()
    elif bad == "splits":
        kwargs["num_splits"] = 0
    else:
        kwargs = {"num_splits": 4,
                  "workspace": DecodeWorkspace.allocate(1, 4, 32, max_splits=2, device=DEVICE)}
    with pytest.raises(ValueError):
        paged_decode(q, b.kv_pool, b.layer, page_table, seq_lens, 0.1, **kwargs)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_heads", [None, 1, 4])  # None: the head size's default
def test_decode_gpu(dtype, group, head_dim, kv_heads):
    seq_lens = [1, 9, 41, 341, 4099, 1000, 16]
    config = None if kv_heads is None else DecodeConfig(block_n=32, kv_heads=kv_heads)
    _, _, _, out, ref = _run(seq_lens, 16, group, head_dim, dtype, num_kv_heads=8,
                             config=config)
    assert_close(out, ref, dtype)


@gpu
@needs_cuda
def test_decode_cuda_graph_replay():
    dtype, num_seqs, head_dim = torch.bfloat16, 4, 128
    b = make_paged_batch([700, 2000, 33, 5000], 16, 8, head_dim, dtype)
    ws = DecodeWorkspace.allocate(num_seqs, 32, head_dim, max_splits=8, device="cuda")
    q = torch.randn(num_seqs, 32, head_dim, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    seq_lens = b.seq_lens.clone()
    args = (q, b.kv_pool, b.layer, b.page_table, seq_lens, 0.09)
    paged_decode(*args, num_splits=8, workspace=ws, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(*args, num_splits=8, workspace=ws, out=out)
    for trial in range(2):
        q.copy_(torch.randn_like(q))
        seq_lens.copy_(b.seq_lens - 7 * trial)  # shorter contexts, same graph
        graph.replay()
        ref = paged_decode_ref(q, b.kv_pool, b.layer, b.page_table, seq_lens, 0.09)
        assert_close(out, ref, dtype)


def test_poisoned_slots_would_be_caught():
    # guards the guard: one token past seq_len is a NaN slot, so an over-read shows up
    b = make_paged_batch([9, 32], 16, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32, device=DEVICE)
    out = paged_decode(q, b.kv_pool, b.layer, b.page_table, b.seq_lens + 1, 0.1)
    assert out[0].isnan().all() and out[1].isnan().all()  # slot 9 of page 0; the padding page


def test_workspace_reused_across_calls():
    # the merge counters must come back to zero, or the next call would merge too early
    ws = DecodeWorkspace.allocate(4, 8, 32, max_splits=6, device=DEVICE)
    for seed in range(2):
        b = make_paged_batch([341, 9, 100][: 3 - seed], 16, 2, 32, torch.float32, seed=seed)
        q = torch.randn(3 - seed, 8, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        out = paged_decode(q, b.kv_pool, b.layer, b.page_table, b.seq_lens, 0.2, num_splits=5,
                           workspace=ws)
        ref = paged_decode_ref(q, b.kv_pool, b.layer, b.page_table, b.seq_lens, 0.2)
        assert_close(out, ref, torch.float32)
        assert ws.counters.abs().sum().item() == 0
