"""The torch reference itself vs fp64 SDPA on contiguous KV (the CPU engine runs on it)."""

from __future__ import annotations

import pytest
import torch
from paged_kv_data import assert_close, make_paged_batch, sdpa_fp64

from kvmesh.kernels import paged_decode_ref, paged_prefill_ref, write_kv_ref


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page_size", [16, 32])
def test_decode_ref_matches_sdpa(group, page_size):
    seq_lens = [1, 9, 41, 341, 32]
    b = make_paged_batch(seq_lens, page_size, 2, 64, torch.float32, device="cpu")
    q = torch.randn(len(seq_lens), 2 * group, 64, generator=torch.Generator().manual_seed(1))
    out = paged_decode_ref(q, b.kv_pool, b.layer, b.page_table, b.seq_lens, 0.125)
    for i in range(len(seq_lens)):
        assert_close(out[i], sdpa_fp64(q[i : i + 1], b.keys[i], b.values[i], 0.125)[0],
                     torch.float32)


def test_decode_ref_keeps_dtype_and_rejects_empty_sequences():
    b = make_paged_batch([9, 17], 16, 2, 32, torch.bfloat16, device="cpu")
    q = torch.randn(2, 4, 32).to(torch.bfloat16)
    out = paged_decode_ref(q, b.kv_pool, b.layer, b.page_table, b.seq_lens, 0.2)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    with pytest.raises(ValueError, match="seq_len >= 1"):
        paged_decode_ref(q, b.kv_pool, b.layer, b.page_table, b.seq_lens * 0, 0.2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        paged_decode_ref(q[:, :3], b.kv_pool, b.layer, b.page_table, b.seq_lens, 0.2)


def test_prefill_ref_matches_sdpa_with_prefix_and_empty_chunk():
    chunks = [(41, 100), (0, 17), (9, 9)]
    b = make_paged_batch([c[1] for c in chunks], 16, 2, 32, torch.float32, device="cpu")
    cu = torch.tensor([0, 41, 41, 50], dtype=torch.int32)
    q = torch.randn(50, 8, 32, generator=torch.Generator().manual_seed(2))
    out = paged_prefill_ref(q, b.kv_pool, b.layer, b.page_table, cu, b.seq_lens, 0.3)
    assert_close(out[:41], sdpa_fp64(q[:41], b.keys[0], b.values[0], 0.3), torch.float32)
    assert_close(out[41:], sdpa_fp64(q[41:], b.keys[2], b.values[2], 0.3), torch.float32)
    with pytest.raises(ValueError, match="new tokens"):
        paged_prefill_ref(q, b.kv_pool, b.layer, b.page_table,
                          torch.tensor([0, 41, 41, 50], dtype=torch.int32),
                          torch.tensor([100, 17, 5], dtype=torch.int32), 0.3)


def test_write_ref_then_decode_ref_sees_the_tokens():
    pool = torch.randn(6, 1, 2, 16, 2, 32)
    k, v = torch.randn(20, 2, 32), torch.randn(20, 2, 32)
    page_table = torch.tensor([[4, 1]], dtype=torch.int32)
    slots = torch.cat([4 * 16 + torch.arange(16), 1 * 16 + torch.arange(4)])
    write_kv_ref(pool, 0, k, v, slots)
    q = torch.randn(1, 4, 32)
    out = paged_decode_ref(q, pool, 0, page_table, torch.tensor([20], dtype=torch.int32), 0.2)
    assert_close(out[0], sdpa_fp64(q, k, v, 0.2)[0], torch.float32)
