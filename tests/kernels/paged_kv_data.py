"""Random paged KV batches for kernel tests, with a contiguous copy of the same data.

Poison: every pool slot that no sequence owns is NaN, and page-table entries past a sequence's
pages point at an all-NaN page, so a kernel that reads past seq_len or past its pages turns its
output into NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# per-dtype (atol, rtol) of kernel vs reference (and vs fp64 SDPA); fp32 dots are exact ("ieee")
TOLERANCE = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 5e-2),
}


@dataclass
class PagedBatch:
    kv_pool: torch.Tensor  # [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]
    page_table: torch.Tensor  # [num_seqs, max_pages] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    keys: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim]
    values: list[torch.Tensor]
    layer: int


def make_paged_batch(seq_lens: list[int], page_size: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype, *, num_layers: int = 2, layer: int = 1,
                     shuffle: bool = True, seed: int = 0, device: str = DEVICE) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    num_used = sum(pages_per_seq)
    num_pages = num_used + 3  # spare pages stay NaN; the last one is the padding target
    # the page order has its own generator, so shuffling leaves the K/V values unchanged
    order_gen = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(num_used, generator=order_gen) if shuffle else torch.arange(num_used)
    max_pages = max(pages_per_seq) + 2
    pool = torch.full((num_pages, num_layers, 2, page_size, num_kv_heads, head_dim), math.nan,
                      dtype=dtype)
    page_table = torch.full((len(seq_lens), max_pages), num_pages - 1, dtype=torch.int32)
    keys, values = [], []
    next_page = 0
    for i, n in enumerate(seq_lens):
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pages = order[next_page : next_page + pages_per_seq[i]]
        next_page += pages_per_seq[i]
        page_table[i, : len(pages)] = pages.to(torch.int32)
        for j, page in enumerate(pages.tolist()):
            chunk = slice(j * page_size, min((j + 1) * page_size, n))
            filled = chunk.stop - chunk.start
            pool[page, layer, 0, :filled] = k[chunk]
            pool[page, layer, 1, :filled] = v[chunk]
        keys.append(k.to(device))
        values.append(v.to(device))
    return PagedBatch(pool.to(device), page_table.to(device),
                      torch.tensor(seq_lens, dtype=torch.int32, device=device), keys, values,
                      layer)


def poison_before(batch: PagedBatch, first_keys: list[int]) -> None:
    """Set positions 0 ... first_keys[i] - 1 of sequence i to NaN in the pool (every layer), so
    a kernel that reads a key it must skip turns its output into NaN."""
    page_size = batch.kv_pool.shape[3]
    for i, first_key in enumerate(first_keys):
        for pos in range(first_key):
            page = int(batch.page_table[i, pos // page_size])
            batch.kv_pool[page, :, :, pos % page_size] = math.nan


def window_mask(num_q: int, seq_len: int, sliding_window: int | None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """[num_q, seq_len] bool: may the query at position seq_len - num_q + i see key j.
    transformers' causal mask (j <= p) and sliding-window overlay (j > p - sliding_window)."""
    q_pos = torch.arange(seq_len - num_q, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    return mask if sliding_window is None else mask & (k_pos > q_pos - sliding_window)


def sdpa_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              sliding_window: int | None = None) -> torch.Tensor:
    """Causal (optionally windowed) attention of the last q.shape[0] positions over contiguous
    k, v, in fp64, by torch's SDPA with an explicit `window_mask`.

    q: [num_q, num_heads, head_dim]; k, v: [seq_len, num_kv_heads, head_dim] -> fp64 out.
    """
    num_q, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    qd = q.double().transpose(0, 1)
    kd = k.double().repeat_interleave(group, dim=1).transpose(0, 1)
    vd = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    mask = window_mask(num_q, seq_len, sliding_window, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,
                                                           scale=scale)
    return out.transpose(0, 1)


def round_like_kernel(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x rounded to dtype as a kernel's `.to(dtype)` rounds it: to nearest even on the GPU,
    but towards zero for bf16 in Triton's interpreter (it drops the low 16 bits)."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        x = (x.float().contiguous().view(torch.int32) & -(2**16)).view(torch.float32)
    return x.to(dtype)


def sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """fp32 split-K partials [splits, ...] added in split order, as the consuming kernels do."""
    total = partials[0].clone()
    for partial in partials[1:]:
        total += partial
    return total


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "output holds NaN: a poisoned slot or page was read"
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol)
