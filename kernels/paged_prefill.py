"""Paged prefill / extend attention: a varlen batch of new tokens attends causally to its cached
prefix pages plus itself (chunked prefill and prefix-cache hits).

Grid (query blocks, num_seqs, num_heads). Key blocks wholly before a query block's first
position skip the causal mask; only the blocks on the diagonal pay for it. With a sliding window
a query block's keys start at its first row's first visible key (pages wholly before it are
never read), and a key block that any row may not see (the diagonal, or a block reaching back
past the last row's window) is masked by both bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.kernels._common import check_index_tensor, check_pool, dot_precision, kv_token_offset
from kvmesh.kernels.reference import check_sliding_window

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_prefill_kernel(
    q_ptr, pool_ptr, page_table_ptr, cu_seqlens_ptr, seq_lens_ptr, out_ptr, sm_scale_log2,
    sliding_window, stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_page, stride_token, stride_head, layer_k_offset, v_offset, stride_pt_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    q_block = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    m0 = q_block * BLOCK_M
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    q_pos = prefix_len + offs_m  # position of each query row in its sequence
    q_rows = (q_start + offs_m).to(tl.int64)
    # q: [BLOCK_M, HEAD_DIM]
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    kv_base = pool_ptr + layer_k_offset + (head // GROUP).to(tl.int64) * stride_head
    pt_row = page_table_ptr + seq * stride_pt_seq

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    kv_end = tl.minimum(seq_len, prefix_len + m0 + BLOCK_M)
    if HAS_WINDOW:
        # rows see keys q_pos - sliding_window < key <= q_pos; blocks start at the first row's
        # first key, so they need not align with BLOCK_N
        kv_start = tl.maximum(prefix_len + m0 - sliding_window + 1, 0)
        # blocks starting at or past this reach a key after the first row
        causal_from = prefix_len + m0 + 1 - BLOCK_N
        # blocks starting at or before this hold a key before the last row's window
        window_until = prefix_len + m0 + BLOCK_M - 1 - sliding_window
    else:
        kv_start = 0
        # keys < unmasked_end are visible to every row of this block
        unmasked_end = (prefix_len + m0 + 1) // BLOCK_N * BLOCK_N
    for block_start in range(kv_start, kv_end, BLOCK_N):
        pos = block_start + tl.arange(0, BLOCK_N)
        if HAS_WINDOW:
            is_diag = (block_start > causal_from) | (block_start <= window_until)
        else:
            is_diag = block_start >= unmasked_end
        mask_n = pos < kv_end
        page_id = tl.load(pt_row + pos // PAGE_SIZE, mask=mask_n, other=0)
        row = kv_token_offset(page_id, pos % PAGE_SIZE, stride_page, stride_token)
        # k, v: [BLOCK_N, HEAD_DIM]
        k = tl.load(kv_base + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(kv_base + v_offset + row[:, None] + offs_d[None, :], mask=mask_n[:, None],
                    other=0.0)
        # s: [BLOCK_M, BLOCK_N] in log2 units
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        if is_diag:
            visible = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
            if HAS_WINDOW:
                visible &= pos[None, :] > q_pos[:, None] - sliding_window
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # every valid row sees at least its own key; a padding row past the keys may see none
    if HAS_WINDOW:
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_i[:, None]
    o = out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


def paged_prefill(q: torch.Tensor, kv_pool: torch.Tensor, layer: int, page_table: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                  max_q_len: int | None = None, out: torch.Tensor | None = None,
                  sliding_window: int | None = None) -> torch.Tensor:
    """Extend attention; q: [total_q, num_heads, head_dim] -> out of the same shape.

    cu_seqlens_q: [num_seqs + 1] int32; sequence i's new tokens are the last
    cu_seqlens_q[i+1] - cu_seqlens_q[i] of its seq_lens[i] positions and are already in the
    pool. A zero-length chunk is allowed. Reads kv_pool; writes out. max_q_len (longest chunk)
    is read from cu_seqlens_q when not given (a host sync). With sliding_window=w a query at
    position p attends keys p - w < k <= p, and pages before every query's window are not
    read; None: causal over every key.
    """
    check_sliding_window(sliding_window)
    page_size, _, group = check_pool(kv_pool, layer, q)
    total_q, num_heads, head_dim = q.shape
    check_index_tensor("page_table", page_table, 2, q.device)
    check_index_tensor("cu_seqlens_q", cu_seqlens_q, 1, q.device)
    check_index_tensor("seq_lens", seq_lens, 1, q.device)
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1 or page_table.shape[0] != num_seqs:
        raise ValueError("cu_seqlens_q needs num_seqs + 1 entries and page_table num_seqs rows")
    if out is None:
        out = torch.empty_like(q)
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if num_seqs else 0
    if total_q == 0 or max_q_len == 0:
        return out
    block_m = 64 if head_dim <= 128 else 32
    grid = (triton.cdiv(max_q_len, block_m), num_seqs, num_heads)
    _paged_prefill_kernel[grid](
        q, kv_pool, page_table, cu_seqlens_q, seq_lens, out, scale * _LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_pool.stride(0), kv_pool.stride(3), kv_pool.stride(4),
        layer * kv_pool.stride(1), kv_pool.stride(2), page_table.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=64,
        DOT_PRECISION=dot_precision(q.dtype), HAS_WINDOW=sliding_window is not None,
        num_warps=4, num_stages=2,
    )
    return out
