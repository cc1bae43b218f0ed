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
def _scatter_rows_kernel(src_ptr, dst_ptr, index_ptr, row_words, src_stride, dst_stride,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_words
    dst_row = tl.load(index_ptr + row).to(tl.int64)
    words = tl.load(src_ptr + row.to(tl.int64) * src_stride + cols, mask=mask)
    tl.store(dst_ptr + dst_row * dst_stride + cols, words, mask=mask)


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i] along dim 0 (like dst.index_copy_(0, index, src)). dst and src:
    contiguous, one device and dtype, rows of one shape; index: integer, one entry per src row,
    each within dst and none repeated (not checked: a repeat leaves either row)."""
    if dst.dtype != src.dtype or dst.device != src.device or dst.shape[1:] != src.shape[1:]:
        raise ValueError(f"rows differ: dst {tuple(dst.shape)} {dst.dtype} on {dst.device}, "
                         f"src {tuple(src.shape)} {src.dtype} on {src.device}")
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("dst and src must be contiguous")
    if not len(src):
        _check_index(index, 0)
        return
    row_nbytes = src[0].numel() * src.element_size()
    word = torch.int32 if row_nbytes % 4 == 0 else src.dtype
    scatter_row_spans(dst.view(len(dst), -1).view(word), index,
                      src.view(len(src), -1).view(word))


def scatter_row_spans(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i], :] = src[i, :] for 2-D dst and src whose rows are contiguous spans at any
    row stride (e.g. one layer's slice of every page: pool.view(pages, -1)[:, a:b])."""
    if dst.dim() != 2 or src.dim() != 2 or dst.shape[1] != src.shape[1] \
            or dst.dtype != src.dtype or dst.device != src.device:
        raise ValueError(f"rows differ: dst {tuple(dst.shape)} {dst.dtype} on {dst.device}, "
                         f"src {tuple(src.shape)} {src.dtype} on {src.device}")
    if (dst.shape[1] > 1 and dst.stride(1) != 1) or (src.shape[1] > 1 and src.stride(1) != 1):
        raise ValueError("dst and src must be contiguous")
    _check_index(index, len(src))
    if not len(src):
        return
    row_words = src.shape[1]
    grid = (len(src), triton.cdiv(row_words, _BLOCK))
    _scatter_rows_kernel[grid](src, dst, index.to(src.device), row_words, src.stride(0),
                               dst.stride(0), BLOCK=_BLOCK, num_warps=8)


def _check_index(index: torch.Tensor, num_rows: int) -> None:
    if index.dim() != 1 or len(index) != num_rows or index.dtype.is_floating_point:
        raise ValueError(f"index must be 1-D integer with {num_rows} entries, got "
                         f"{tuple(index.shape)} {index.dtype}")
