"""Paged decode attention: one query token per sequence, split-KV (flash-decoding).

Grid (num_kv_heads / HEADS, num_seqs, num_splits): each program takes HEADS adjacent KV heads
and packs their query heads into one [BLOCK_H, HEAD_DIM] tile, so QK^T and PV are tensor-core
dots, and reads its split's share of the sequence's KV once. A KV tile holds BLOCK_N tokens x
HEADS heads, each token's heads adjacent in the pool, so HEADS > 1 reads longer contiguous runs;
a query row's scores against another head's columns are masked out (the dots do HEADS times the
work a single head would, which tensor cores have to spare). With one split the kernel writes
the output directly; otherwise each program writes fp32 partials and their log-sum-exp, and the
last program of a (sequence, KV heads) to finish, counted by an atomic, merges them: one launch
either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvmesh.kernels._common import (
    check_index_tensor,
    check_pool,
    dot_precision,
    kv_token_offset,
    pdl_args,
    pdl_wait,
)
from kvmesh.kernels.reference import check_sliding_window

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64
_MIN_TOKENS_PER_SPLIT = 64
# programs per SM assumed when the caller does not say (measured with 2-stage 64-token tiles at
# head_dim 128 on the H100: 64 KB of shared memory each; the engine passes its own count)
_CTAS_PER_SM = 3


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, seq, block, num_splits,
                  stride_po_seq, stride_po_head, stride_po_split, stride_pl_seq, stride_pl_head,
                  stride_o_seq, stride_o_head,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Merge the split partials of query heads block * GROUP ... + GROUP - 1 (one program's)
    by their log-sum-exp, CHUNK splits per step."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_g = offs_g < GROUP
    head = (block * GROUP + offs_g).to(tl.int64)
    pl = part_lse_ptr + seq * stride_pl_seq + head * stride_pl_head  # [BLOCK_G]
    po = part_out_ptr + seq * stride_po_seq + head * stride_po_head  # [BLOCK_G]
    m_all = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_all = tl.zeros([BLOCK_G], dtype=tl.float32)
    o_all = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        split = s0 + offs_c
        mask = mask_g[:, None] & (split < num_splits)[None, :]
        # .cg: other programs wrote these; read them from L2, never from a stale L1 line
        # lse: [BLOCK_G, CHUNK]; an empty split has -inf and gets weight 0
        lse = tl.load(pl[:, None] + split[None, :], mask=mask, other=float("-inf"),
                      cache_modifier=".cg")
        # part: [BLOCK_G, CHUNK, HEAD_DIM]
        part = tl.load(po[:, None, None] + split[None, :, None] * stride_po_split
                       + offs_d[None, None, :], mask=mask[:, :, None], other=0.0,
                       cache_modifier=".cg")
        m_new = tl.maximum(m_all, tl.max(lse, axis=1))
        alpha = tl.exp2(m_all - m_new)
        weight = tl.exp2(lse - m_new[:, None])
        o_all = o_all * alpha[:, None] + tl.sum(part * weight[:, :, None], axis=1)
        l_all = l_all * alpha + tl.sum(weight, axis=1)
        m_all = m_new
    # split 0 always holds tokens (seq_len >= 1), so l_all > 0 on real heads
    l_all = tl.where(mask_g, l_all, 1.0)
    o = out_ptr + seq * stride_o_seq + head[:, None] * stride_o_head + offs_d[None, :]
    tl.store(o, (o_all / l_all[:, None]).to(out_ptr.dtype.element_ty), mask=mask_g[:, None])


@triton.jit
def _paged_decode_kernel(
    q_ptr, pool_ptr, page_table_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    counter_ptr, sm_scale_log2, sliding_window,
    stride_q_seq, stride_q_head, stride_o_seq, stride_o_head,
    stride_page, stride_token, stride_head, layer_k_offset, v_offset, stride_pt_seq,
    stride_po_seq, stride_po_head, stride_po_split, stride_pl_seq, stride_pl_head,
    stride_cnt_seq,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_CHUNK: tl.constexpr,
    HAS_WINDOW: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    # KV heads first: programs launched together read the heads of the same tokens, adjacent in
    # the pool (4-5% faster at batch 32/64 on the H200 than sequences first)
    kv_block = tl.program_id(0)  # KV heads kv_block * HEADS ... + HEADS - 1
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The splits share out the keys first_key ... seq_len - 1: with a window the query (at
    # seq_len - 1) sees only the last sliding_window of them, and no tile starts before them,
    # so pages wholly before the window are never read and none needs a mask
    if HAS_WINDOW:
        first_key = tl.maximum(seq_len - sliding_window, 0)
    else:
        first_key = 0
    # Each split takes a whole number of BLOCK_N blocks; trailing splits may be empty.
    num_blocks = (seq_len - first_key + BLOCK_N - 1) // BLOCK_N
    blocks_per_split = (num_blocks + num_splits - 1) // num_splits
    start = first_key + split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_block * (HEADS * GROUP) + offs_h  # query heads of this program's KV heads
    mask_h = offs_h < HEADS * GROUP
    # q: [BLOCK_H, HEAD_DIM]
    q = tl.load(q_ptr + seq * stride_q_seq + head[:, None] * stride_q_head + offs_d[None, :],
                mask=mask_h[:, None], other=0.0)
    # KV tile columns: token c // HEADS, KV head c % HEADS (a token's heads are adjacent);
    # query row r scores only its own KV head's columns (padding rows none)
    offs_c = tl.arange(0, BLOCK_N * HEADS)
    col_head = offs_c % HEADS
    own_head = (offs_h // GROUP)[:, None] == col_head[None, :]
    kv_base = pool_ptr + layer_k_offset + (kv_block * HEADS).to(tl.int64) * stride_head
    pt_row = page_table_ptr + seq * stride_pt_seq

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for block_start in range(start, end, BLOCK_N):
        pos = block_start + offs_c // HEADS
        mask_n = pos < end
        page_id = tl.load(pt_row + pos // PAGE_SIZE, mask=mask_n, other=0)
        row = kv_token_offset(page_id, pos % PAGE_SIZE, stride_page, stride_token) \
            + col_head.to(tl.int64) * stride_head
        # k, v: [BLOCK_N * HEADS, HEAD_DIM]
        k = tl.load(kv_base + row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(kv_base + v_offset + row[:, None] + offs_d[None, :], mask=mask_n[:, None],
                    other=0.0)
        # s: [BLOCK_H, BLOCK_N * HEADS], already in log2 units
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        s = tl.where(mask_n[None, :] & own_head, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an empty split has l == 0 and acc == 0
    acc = acc / l_safe[:, None]
    if IS_SPLIT:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # log2 units
        po_base = part_out_ptr + seq * stride_po_seq + head[:, None].to(tl.int64) * stride_po_head
        pl_base = part_lse_ptr + seq * stride_pl_seq + head * stride_pl_head
        tl.store(po_base + split * stride_po_split + offs_d[None, :], acc, mask=mask_h[:, None])
        tl.store(pl_base + split, lse, mask=mask_h)
        # The last split of this (sequence, KV group) to finish merges all of them, so decode is
        # one launch. The barrier orders every thread's partial stores before the release.
        tl.debug_barrier()
        counter = counter_ptr + seq * stride_cnt_seq + kv_block
        num_done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if num_done == num_splits - 1:
            _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, seq, kv_block, num_splits,
                          stride_po_seq, stride_po_head, stride_po_split, stride_pl_seq,
                          stride_pl_head, stride_o_seq, stride_o_head,
                          HEADS * GROUP, HEAD_DIM, BLOCK_G, MERGE_CHUNK)
            tl.store(counter, 0)  # ready for the next call or graph replay
    else:
        o = out_ptr + seq * stride_o_seq + head[:, None] * stride_o_head + offs_d[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_h[:, None])


@dataclass(frozen=True)
class DecodeWorkspace:
    """Preallocated split-KV partials, so decode can be captured in a CUDA graph.

    part_out: [max_num_seqs, num_heads, max_splits, head_dim] fp32
    part_lse: [max_num_seqs, num_heads, max_splits] fp32
    counters: [max_num_seqs, num_heads] int32, zero between calls (the kernel resets them);
      only the first num_kv_heads / (KV heads a program) columns are used
    One workspace serves one decode call at a time (one stream).
    """

    part_out: torch.Tensor
    part_lse: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def allocate(cls, max_num_seqs: int, num_heads: int, head_dim: int,
                 max_splits: int = MAX_SPLITS, device: torch.device | str = "cuda"
                 ) -> DecodeWorkspace:
        if min(max_num_seqs, num_heads, head_dim, max_splits) < 1:
            raise ValueError("workspace dimensions must be >= 1")
        part_out = torch.empty(max_num_seqs, num_heads, max_splits, head_dim,
                               dtype=torch.float32, device=device)
        part_lse = torch.empty(max_num_seqs, num_heads, max_splits, dtype=torch.float32,
                               device=device)
        counters = torch.zeros(max_num_seqs, num_heads, dtype=torch.int32, device=device)
        return cls(part_out, part_lse, counters)

    def fits(self, num_seqs: int, num_heads: int, head_dim: int, num_splits: int) -> bool:
        s, h, n, d = self.part_out.shape
        return num_seqs <= s and num_heads == h and num_splits <= n and head_dim == d


@dataclass(frozen=True)
class DecodeConfig:
    """Tile and launch parameters of the decode kernel (tuned in benchmarks/kernel_bench.py)."""

    # 2 warps, 3 stages: on the H200 at a 1,152-token context, batch 1/32/64, head_dim 64 and
    # 128, as fast or faster (1-20%) than 4 warps / 2 stages in every case (RESULTS.md)
    block_n: int = 64  # tokens per KV tile
    num_warps: int = 2
    num_stages: int = 3
    # KV heads per program (a power of two; the launch takes its gcd with the pool's KV heads)
    kv_heads: int = 1

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError("num_warps must be a power of two <= 16 and num_stages >= 1")
        if self.kv_heads < 1 or self.kv_heads & (self.kv_heads - 1):
            raise ValueError(f"kv_heads must be a power of two >= 1, got {self.kv_heads}")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> DecodeConfig:
        """The default for a head size. Measured on the H200 at batch 32, 1,152-token contexts
        (RESULTS.md, issue 4 ninth pass): at head_dim 64, two KV heads of 32-token tiles per
        program (23.7 us a layer against 24.9 for one head of 64 tokens; the 1B step 1.261 ->
        1.241 ms); at head_dim 128 one head (two were no faster)."""
        return cls(block_n=32, kv_heads=2) if head_dim <= 64 else cls()

    def kv_blocks(self, num_kv_heads: int) -> int:
        """Programs per sequence and split over a pool of num_kv_heads KV heads."""
        return num_kv_heads // math.gcd(self.kv_heads, num_kv_heads)


def num_kv_splits(num_seqs: int, kv_blocks: int, max_seq_len: int,
                  num_sms: int | None = None, total_tokens: int | None = None,
                  ctas_per_sm: int = _CTAS_PER_SM) -> int:
    """Splits per sequence so that one wave of programs fills the GPU; kv_blocks: programs per
    sequence and split (`DecodeConfig.kv_blocks`: the KV heads, over the heads per program).

    Programs of one launch do about equal work, so a partial last wave idles most SMs: with
    fewer programs than resident slots (_CTAS_PER_SM per SM) take as many splits as fit in one
    wave; otherwise one. Programs are counted in units of the longest sequence: with
    total_tokens (varlen batches) a batch weighs total_tokens / max_seq_len sequences, so short
    sequences leave room for more splits of the long ones. A split never gets fewer than
    _MIN_TOKENS_PER_SPLIT tokens. Measured on the H100 in benchmarks/RESULTS.md; a caller that
    measured better slot counts for its shapes passes ctas_per_sm (the engine does).
    """
    if num_sms is None:
        num_sms = 8  # CPU (interpreter): any small grid will do
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            num_sms = props.multi_processor_count
    max_seq_len = max(max_seq_len, 1)
    full_seqs = num_seqs if total_tokens is None else triton.cdiv(total_tokens, max_seq_len)
    programs = max(min(full_seqs, num_seqs) * kv_blocks, 1)
    slots = ctas_per_sm * num_sms
    cap = triton.cdiv(max_seq_len, _MIN_TOKENS_PER_SPLIT)
    return max(1, min(slots // programs, cap, MAX_SPLITS))


def paged_decode(q: torch.Tensor, kv_pool: torch.Tensor, layer: int, page_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, *, num_splits: int | None = None,
                 workspace: DecodeWorkspace | None = None,
                 out: torch.Tensor | None = None,
                 config: DecodeConfig | None = None,
                 sliding_window: int | None = None) -> torch.Tensor:
    """Decode attention; q: [num_seqs, num_heads, head_dim] -> out (same shape, q's dtype).

    Reads kv_pool; writes out and the workspace. Every seq_len must be >= 1 (not checked on
    device). For CUDA-graph capture pass num_splits, workspace and out: then nothing here syncs
    or allocates. Without num_splits it is chosen from the max and sum of seq_lens (a host sync),
    each capped at the window. With sliding_window=w the query (position seq_len - 1) attends
    only the last w keys, and only their pages are read; None: every key.
    """
    check_sliding_window(sliding_window)
    page_size, num_kv_heads, group = check_pool(kv_pool, layer, q)
    num_seqs, num_heads, head_dim = q.shape
    check_index_tensor("page_table", page_table, 2, q.device)
    check_index_tensor("seq_lens", seq_lens, 1, q.device)
    if page_table.shape[0] != num_seqs or seq_lens.shape[0] != num_seqs:
        raise ValueError("page_table and seq_lens need one row per sequence")
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    config = config or DecodeConfig.for_head_dim(head_dim)
    kv_blocks = config.kv_blocks(num_kv_heads)
    if num_splits is None:
        # keys each query attends: with a window, at most sliding_window of them
        lens = seq_lens if sliding_window is None else seq_lens.clamp(max=sliding_window)
        max_len, total = torch.stack([lens.max(), lens.sum()]).tolist()
        num_splits = num_kv_splits(num_seqs, kv_blocks, max_len, total_tokens=total)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    is_split = num_splits > 1
    if is_split:
        if workspace is None:
            workspace = DecodeWorkspace.allocate(num_seqs, num_heads, head_dim, num_splits,
                                                 q.device)
        if not workspace.fits(num_seqs, num_heads, head_dim, num_splits):
            raise ValueError("workspace too small for this batch / split count")
        part_out, part_lse, counters = workspace.part_out, workspace.part_lse, workspace.counters
    else:
        part_out = part_lse = counters = out  # unused: IS_SPLIT is False
    heads = num_kv_heads // kv_blocks
    rows = heads * group  # query heads per program
    _paged_decode_kernel[(kv_blocks, num_seqs, num_splits)](
        q, kv_pool, page_table, seq_lens, out, part_out, part_lse, counters, scale * _LOG2E,
        sliding_window or 0, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_pool.stride(0), kv_pool.stride(3), kv_pool.stride(4),
        layer * kv_pool.stride(1), kv_pool.stride(2), page_table.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2) if is_split else 0,
        part_lse.stride(0), part_lse.stride(1), counters.stride(0),
        GROUP=group, HEADS=heads, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_H=max(16, triton.next_power_of_2(rows)), BLOCK_N=config.block_n,
        IS_SPLIT=is_split, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_G=triton.next_power_of_2(rows), MERGE_CHUNK=8,
        HAS_WINDOW=sliding_window is not None,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_args(q.device),
    )
    return out
