"""cuda_host's host-to-device copies: runs of pages at one stride as 2-D copies, refused ones
halved, spans of every row in turn; on the GPU, and on a stand-in for libcudart that records
the calls (no GPU needed)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.gpu
def test_copy_async_merges_strided_sources_into_one_2d_copy():
    """Pages back to back behind 48-byte headers (a store segment) go as 2-D copies; a page out
    of stride and one of a different run still land in their rows. Then pages of separate pinned
    allocations that may lie at one stride: CUDA refuses a 2-D copy across allocations, and
    those go page by page."""
    from kvmesh.workers.runner.cuda_host import copy_async, cudart

    lib = cudart()
    assert lib is not None
    row, pitch, n = 1536, 1536 + 48, 7
    segment = torch.randint(0, 256, (n + 2, pitch), dtype=torch.uint8).pin_memory()
    sources = [segment[i, 48:].data_ptr() for i in range(5)]  # one strided run
    sources += [segment[8, :row].data_ptr(), segment[6, 48:].data_ptr()]  # out of stride
    out = torch.zeros(n, row, dtype=torch.uint8, device="cuda")
    copy_async(lib, [(out[i].data_ptr(), a) for i, a in enumerate(sources)], row,
               torch.cuda.current_stream())
    torch.cuda.synchronize()
    expected = torch.stack([segment[i, 48:] for i in range(5)] + [segment[8, :row],
                                                                   segment[6, 48:]])
    assert torch.equal(out.cpu(), expected)
    pages = [torch.randint(0, 256, (row,), dtype=torch.uint8).pin_memory() for _ in range(6)]
    out.zero_()
    copy_async(lib, [(out[i].data_ptr(), p.data_ptr()) for i, p in enumerate(pages)], row,
               torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert torch.equal(out[:6].cpu(), torch.stack(pages))


class _RecordingCudart:
    """Stands in for libcudart where no GPU is: records the copy calls copy_async makes, and
    refuses a 2-D copy whose sources span one of `boundaries` (the end of one allocation), as
    CUDA does (the real calls run in the gpu test above)."""

    def __init__(self, boundaries: tuple[int, ...] = ()):
        self.calls = []
        self.boundaries = boundaries

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.calls.append(("1d", dst, src, nbytes))
        return 0

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self.calls.append(("2d", dst, dpitch, src, spitch, width, height))
        end = src + spitch * (height - 1) + width
        return 1 if any(src < b < end for b in self.boundaries) else 0

    def cudaGetLastError(self):
        self.calls.append(("clear",))
        return 0


@pytest.mark.parametrize(("copies", "expected"), [
    # back to back behind 16-byte headers: one 2-D copy
    ([(0, 1016), (100, 1132), (200, 1248)], [("2d", 0, 100, 1016, 116, 100, 3)]),
    # pitch == row size (no headers) still merges; a destination gap ends the run
    ([(0, 500), (100, 600), (300, 700)],
     [("2d", 0, 100, 500, 100, 100, 2), ("1d", 300, 700, 100)]),
    # sources closer than a row (overlapping) or going backwards: one copy each
    ([(0, 500), (100, 550)], [("1d", 0, 500, 100), ("1d", 100, 550, 100)]),
    ([(0, 900), (100, 700)], [("1d", 0, 900, 100), ("1d", 100, 700, 100)]),
    # a stride change starts a new run; the last page alone is a plain copy
    ([(0, 0), (100, 200), (200, 400), (300, 500), (400, 600), (500, 900)],
     [("2d", 0, 100, 0, 200, 100, 3), ("2d", 300, 100, 500, 100, 100, 2),
      ("1d", 500, 900, 100)]),
])
def test_copy_async_merges_only_runs_at_one_stride(copies, expected):
    from types import SimpleNamespace

    from kvmesh.workers.runner.cuda_host import copy_async

    lib = _RecordingCudart()
    copy_async(lib, copies, 100, SimpleNamespace(cuda_stream=0))
    assert lib.calls == expected


def test_copy_async_splits_a_2d_copy_that_crosses_allocations():
    """Eight pages at one stride whose sources cross from one allocation into the next (at
    5000): the refused 2-D copy is halved until each part lies in one allocation."""
    from types import SimpleNamespace

    from kvmesh.workers.runner.cuda_host import copy_async

    lib = _RecordingCudart(boundaries=(5000,))
    copy_async(lib, [(100 * i, 1000 * i) for i in range(8)], 100,
               SimpleNamespace(cuda_stream=0))
    assert lib.calls == [
        ("2d", 0, 100, 0, 1000, 100, 8), ("clear",),
        ("2d", 0, 100, 0, 1000, 100, 4),  # pages 0-3: one allocation
        ("2d", 400, 100, 4000, 1000, 100, 4), ("clear",),
        ("2d", 400, 100, 4000, 1000, 100, 2), ("clear",),
        ("1d", 400, 4000, 100), ("1d", 500, 5000, 100),  # the pages on either side
        ("2d", 600, 100, 6000, 1000, 100, 2),
    ]


def test_copy_rows_async_sends_each_span_of_every_row_in_turn():
    """Two spans (bytes 0..40 and 40..100 of 100-byte rows) of three rows stored 130 bytes
    apart and one row elsewhere: the runs are found once, then each span goes as one 2-D copy
    per run, and the caller hears after each span."""
    from types import SimpleNamespace

    from kvmesh.workers.runner.cuda_host import address_runs, copy_rows_async

    lib = _RecordingCudart()
    sources = [1000, 1130, 1260, 5000]
    assert address_runs(sources, 100) == [(0, 3, 130), (3, 1, 100)]
    copy_rows_async(lib, 0, sources, 100, [(0, 40), (40, 60)], SimpleNamespace(cuda_stream=0),
                    after_span=lambda k: lib.calls.append(("span", k)))
    assert lib.calls == [
        ("2d", 0, 100, 1000, 130, 40, 3), ("1d", 300, 5000, 40), ("span", 0),
        ("2d", 40, 100, 1040, 130, 60, 3), ("1d", 340, 5040, 60), ("span", 1),
    ]


@pytest.mark.parametrize(("addresses", "runs"), [
    ([], []),
    ([0, 100, 250, 400, 550], [(0, 2, 100), (2, 3, 150)]),
    ([0, 50, 100], [(0, 1, 100), (1, 1, 100), (2, 1, 100)]),  # closer than an object
    ([900, 100], [(0, 1, 100), (1, 1, 100)]),
])
def test_address_runs_split_at_every_change_of_stride(addresses, runs):
    from kvmesh.workers.runner.cuda_host import address_runs

    assert address_runs(addresses, 100) == runs
