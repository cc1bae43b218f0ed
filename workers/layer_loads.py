"""Prefix hits loaded layer by layer under the step that uses them.

A host-tier or store hit of an 8K-token Llama-3.2-1B prefix is 268 MB over PCIe (~5 ms at the
H200's 55 GB/s), and the step that computes the suffix needed all of it before its first layer.
Here the pages are copied one layer at a time (one 2-D copy per run of pages and layer, as fast
as whole pages) on a copy stream into a staging buffer allocated once, and an event is recorded
after each layer. The decode graphs are captured a second time with each layer first waiting
for its event, as an external event node, and moving that layer of the staged pages into their
pool pages (`kernels.scatter_rows`, ids and count in buffers of their own), so layer L computes
as soon as layer L of every page has arrived. The checksums still cover whole pages and are read
before the step's token is kept (`Scheduler.commit_load`).

One load at a time uses the buffer (a second one in the same step takes the ordinary path); it
is given back once the step that read it is queued, or copied out when its sequence has to wait.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.cuda_host import RawEvents, copy_span_async, cudart, source_runs

log = logging.getLogger(__name__)


class LayerLoads:
    """The staging buffer [max_pages, *page_shape], the per-layer events, the copy stream, and
    the buffers the captured graphs read the pages' pool ids from. Engine thread only."""

    def __init__(self, kv_pool: torch.Tensor, max_pages: int) -> None:
        lib = cudart()
        assert lib is not None
        self.lib = lib
        self.kv_pool = kv_pool
        self.num_layers = kv_pool.shape[1]
        self.max_pages = max_pages
        self.rows = torch.empty((max_pages, *kv_pool.shape[1:]), dtype=kv_pool.dtype,
                                device=kv_pool.device)
        self.ids = torch.zeros(max_pages, dtype=torch.int64, device=kv_pool.device)
        self.count = torch.zeros(1, dtype=torch.int32, device=kv_pool.device)
        self._host_ids = torch.zeros(max_pages, dtype=torch.int64, pin_memory=True)
        self._host_count = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.events = RawEvents(lib, self.num_layers)
        self.copy_stream = torch.cuda.Stream(kv_pool.device)
        self.done: torch.cuda.Event | None = None  # after the last layer of the last load
        self.busy = False
        page_words = self.rows[0].numel() * self.rows.element_size() // 4
        self._width = page_words // self.num_layers
        self._pool_words = kv_pool.view(len(kv_pool), -1).view(torch.int32)
        self._row_words = self.rows.view(max_pages, -1).view(torch.int32)

    @staticmethod
    def fits(kv_pool: torch.Tensor) -> bool:
        layer_nbytes = kv_pool[0, 0].numel() * kv_pool.element_size()
        return kv_pool.shape[1] > 1 and layer_nbytes % 4 == 0

    # ------------------------------------------------------------------ inside the graphs
    def before_layer(self, layer: int) -> None:
        """Captured before each layer: wait for its copies, move it into the pool pages."""
        from kernels.scatter_rows import scatter_row_spans

        stream = torch.cuda.current_stream(self.kv_pool.device)
        if torch.cuda.is_current_stream_capturing():
            self.events.wait(layer, stream)  # (the warm-up runs before capture move nothing)
        span = slice(layer * self._width, (layer + 1) * self._width)
        scatter_row_spans(self._pool_words[:, span], self.ids, self._row_words[:, span],
                          count=self.count)

    # ------------------------------------------------------------------ loads
    def take(self, num_pages: int) -> torch.Tensor | None:
        """Staging rows for a load of num_pages, or None (in use, or too many pages)."""
        if self.busy or not 0 < num_pages <= self.max_pages:
            return None
        self.busy = True
        return self.rows[:num_pages]

    def copy(self, sources: Sequence[int], row_nbytes: int) -> torch.cuda.Event:
        """Queue the copies of the payloads at `sources` into the first rows, layer by layer,
        recording each layer's event; returns the event of the last layer."""
        stream = self.copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.kv_pool.device))  # the last reader
        width = row_nbytes // self.num_layers
        runs = source_runs(sources, row_nbytes)
        for layer in range(self.num_layers):
            copy_span_async(self.lib, self.rows.data_ptr(), row_nbytes, sources, runs,
                            layer * width, width, stream)
            self.events.record(layer, stream)
        self.done = torch.cuda.Event()
        self.done.record(stream)
        return self.done

    def target(self, page_ids: Sequence[int]) -> None:
        """Pool page ids of the first rows, for the next load graph replay (copied on the
        current stream, before it; every step ends in a sync, so the pinned rows are free)."""
        n = len(page_ids)
        self._host_ids[:n] = torch.tensor(page_ids, dtype=torch.int64)
        self._host_count[0] = n
        self.ids[:n].copy_(self._host_ids[:n], non_blocking=True)
        self.count.copy_(self._host_count, non_blocking=True)

    def wait_all(self) -> None:
        """The current stream waits for every layer (a step that does not use the graphs)."""
        if self.done is not None:
            torch.cuda.current_stream(self.kv_pool.device).wait_event(self.done)

    def release(self) -> None:
        self.busy = False


@dataclass(eq=False)
class LayeredRows:
    """Staged rows that lie in a LayerLoads buffer (rows 0..n-1) and arrive layer by layer: the
    source of a load's page rows (pool_copies.StagedRow) until the step that uses them."""

    rows: torch.Tensor
    loads: LayerLoads


def split_layered(loads: Sequence[tuple[int, tuple[object, int]]]
                  ) -> tuple[LayeredRows | None, list[int], list[tuple[int, tuple[object, int]]]]:
    """(the layered source, pool ids of its rows 0..n-1 in order, the other loads); (None, [],
    loads) when no load is layered or its rows are not exactly 0..n-1 (then the caller waits
    for every layer and copies them as usual)."""
    layered = [(pid, src, row) for pid, (src, row) in loads if isinstance(src, LayeredRows)]
    if not layered or [row for _, _, row in layered] != list(range(len(layered))):
        return None, [], list(loads)
    source = layered[0][1]
    assert all(src is source for _, src, _ in layered)  # one load at a time uses the buffer
    rest = [(pid, r) for pid, r in loads if not isinstance(r[0], LayeredRows)]
    return source, [pid for pid, _, _ in layered], rest
