"""dst[index[i]] = src[i] for whole rows: staged KV pages into their pool pages.

A prefix hit loads hundreds of pages (an 8K-token Llama-3.2-1B prefix is 512 pages of 512 KiB)
into rows of one staging tensor; their pool pages are wherever the block manager found room.
`torch.index_copy_` moved such a batch at under 1 TB/s on the H200; here one program copies a
block of one row, so the copy runs at the device's copy bandwidth whatever the page order. Rows
are moved as 32-bit words when their size allows (any dtype), row offsets in int64 (a pool
holds more than 2^31 words).
"""

from __future__ import annotations

import torch
import triton  # (kernels/__init__ has set TRITON_INTERPRET where there is no CUDA)
import triton.language as tl

_BLOCK = 8192  # words per program: 32 KiB of a row


@triton.jit
def _scatter_rows_kernel(src_ptr, dst_ptr, index_ptr, row_words, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_words
    dst_row = tl.load(index_ptr + row).to(tl.int64)
    words = tl.load(src_ptr + row.to(tl.int64) * row_words + cols, mask=mask)
    tl.store(dst_ptr + dst_row * row_words + cols, words, mask=mask)


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i] along dim 0 (like dst.index_copy_(0, index, src)). dst and src:
    contiguous, one device and dtype, rows of one shape; index: integer, one entry per src row,
    each within dst and none repeated (not checked: a repeat leaves either row)."""
    if dst.dtype != src.dtype or dst.device != src.device or dst.shape[1:] != src.shape[1:]:
        raise ValueError(f"rows differ: dst {tuple(dst.shape)} {dst.dtype} on {dst.device}, "
                         f"src {tuple(src.shape)} {src.dtype} on {src.device}")
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("dst and src must be contiguous")
    if index.dim() != 1 or len(index) != len(src) or index.dtype.is_floating_point:
        raise ValueError(f"index must be 1-D integer with {len(src)} entries, got "
                         f"{tuple(index.shape)} {index.dtype}")
    if not len(src):
        return
    row_nbytes = src[0].numel() * src.element_size()
    word = torch.int32 if row_nbytes % 4 == 0 else src.dtype
    flat_dst, flat_src = dst.view(len(dst), -1).view(word), src.view(len(src), -1).view(word)
    row_words = flat_src.shape[1]
    grid = (len(src), triton.cdiv(row_words, _BLOCK))
    _scatter_rows_kernel[grid](flat_src, flat_dst, index.to(src.device), row_words,
                               BLOCK=_BLOCK, num_warps=8)
