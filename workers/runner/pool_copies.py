"""Copies between the device KV pool and host memory, page by page in bulk.

- `upload_pages`: staged rows (kv_upload.PageStager) -> their pool slots, by runs or one
  scatter on the device; `upload_layers`: one layer run of rows still arriving
  (`ArrivingRows`), once it is in;
- `HostCopySlots`: page-sized pinned host buffers, allocated once, that the store write-through
  copies pool pages into (device -> host).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


class HostCopySlots:
    """Page-sized pinned host buffers for the store write-through, allocated once as one tensor
    (on a background thread from `start()`: pinning a GB takes about a second) and handed out
    in O(1): copying a page out then costs no allocator call on the engine thread (torch's
    pinned-memory cache made a step registering 513 pages wait ~0.1-0.3 s). Thread-safe."""

    def __init__(self, page_shape: tuple[int, ...], dtype: torch.dtype, nbytes: int,
                 pin_memory: bool = True) -> None:
        self.page_shape, self.dtype, self.pin_memory = page_shape, dtype, pin_memory
        self.count = max(1, nbytes // (int(np.prod(page_shape)) * dtype.itemsize))
        self.rows: torch.Tensor | None = None  # [count, *page_shape], pinned
        self._free: list[int] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._allocate, name="kvmesh-pin-slots",
                                        daemon=True)
        self._thread.start()

    def _allocate(self) -> None:
        try:
            self.rows = torch.empty((self.count, *self.page_shape), dtype=self.dtype,
                                    pin_memory=self.pin_memory)
            with self._lock:
                self._free = list(range(self.count - 1, -1, -1))
        except Exception:  # no slots: every write-through is dropped (and counted)
            log.warning("no pinned memory for %d store host-copy slots", self.count, exc_info=True)
        finally:
            self._ready.set()

    def take(self, n: int) -> list[int]:
        """Up to n free slots (fewer when the writer is behind); waits for the allocation once."""
        if self._thread is None:
            self.start()
        self._ready.wait()
        with self._lock:
            taken = self._free[-n:] if n else []
            del self._free[len(self._free) - len(taken):]
        return taken[::-1]

    def give_back(self, slots: Sequence[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)


def runs(n: int, continues: Callable[[int], bool]) -> list[range]:
    """range(n) cut into maximal runs: index i joins the run before it when continues(i)."""
    out: list[range] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or not continues(i):
            out.append(range(start, i))
            start = i
    return out


# pages of a prefix hit arrive in this many layer runs (consecutive layers of every page): the
# step computes each layer run as soon as it is in (pinned sends on CUDA; page_sends.CheckedSend)
LOAD_LAYER_RUNS = 4


def layer_runs(num_layers: int, count: int = LOAD_LAYER_RUNS) -> list[range]:
    """The layers cut into `count` (or fewer) consecutive runs as even as they go."""
    count = max(1, min(count, num_layers))
    bounds = [num_layers * k // count for k in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass(eq=False)
class ArrivingRows:
    """Staged rows still being copied in on another stream, one layer run of every row at a
    time: `events[k]` completes once layers `layer_runs[k]` of every row are in (the last event:
    all of it). Work on the current stream must wait for them first (`wait`)."""

    rows: torch.Tensor
    events: list[torch.cuda.Event]
    layer_runs: list[range]

    def wait(self, run: int | None = None) -> None:
        """The current stream waits for one layer run (None: all of them)."""
        event = self.events[-1 if run is None else run]
        torch.cuda.current_stream(self.rows.device).wait_event(event)


# (staged tensor, or rows still arriving, row): one page, kept as a reference
StagedRow = tuple["torch.Tensor | ArrivingRows", int]


def upload_layers(kv_pool: torch.Tensor, page_ids: torch.Tensor, source: ArrivingRows,
                  run: int) -> None:
    """kv_pool[page_ids[i]] = source.rows[i] for layers source.layer_runs[run] only, once they
    have arrived (rows 0..len(page_ids)-1; CUDA: kernels.scatter_rows)."""
    from kvmesh.kernels.scatter_rows import scatter_row_spans

    source.wait(run)
    layers = source.layer_runs[run]
    layer_nbytes = kv_pool[0, 0].numel() * kv_pool.element_size()
    word = torch.int32 if layer_nbytes % 4 == 0 else torch.uint8  # moved as words if it can
    words = layer_nbytes // word.itemsize
    span = slice(layers.start * words, layers.stop * words)
    scatter_row_spans(as_words(kv_pool, word)[:, span], page_ids,
                      as_words(source.rows, word)[: len(page_ids), span])


def as_words(rows: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """A contiguous [n, ...] tensor as [n, words] of `word`, same memory."""
    return rows.view(len(rows), -1).view(torch.uint8).view(word)


def arriving_loads(loads: Sequence[tuple[int, StagedRow]], runs_of_layers: list[range]
                   ) -> list[tuple[ArrivingRows, list[int]]]:
    """The loads whose rows still arrive a layer run at a time (in `runs_of_layers`), as
    (source, pool page ids of its rows 0..n-1); [] unless every such source's rows go in that
    order from row 0, in those layer runs (then the caller waits for all of it)."""
    targets: dict[int, tuple[ArrivingRows, list[int]]] = {}
    for page_id, (source, row) in loads:
        if isinstance(source, ArrivingRows):
            ids = targets.setdefault(id(source), (source, []))[1]
            if row != len(ids) or source.layer_runs != runs_of_layers:
                return []
            ids.append(page_id)
    return list(targets.values())


def upload_pages(kv_pool: torch.Tensor, page_ids: Sequence[int],
                 rows: Sequence[StagedRow]) -> None:
    """kv_pool[page_ids[i]] = source[row] for (source, row) = rows[i]. Runs of consecutive page
    ids and consecutive rows of one source go as one copy; a source scattered over more than
    _MAX_RUN_COPIES runs goes as one scatter on the device (a gather first when its rows are
    out of order). Asynchronous on CUDA (non_blocking from pinned sources)."""
    groups: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
    for page_id, (staged, row) in zip(page_ids, rows, strict=True):
        source = staged
        if isinstance(staged, ArrivingRows):  # every layer in first
            source = staged.rows
            if id(source) not in groups:
                staged.wait()
        group = groups.setdefault(id(source), (source, [], []))
        group[1].append(page_id)
        group[2].append(row)
    for source, ids, index in groups.values():
        spans = _runs_of_both(ids, index)
        if len(spans) > _MAX_RUN_COPIES and source.device == kv_pool.device:
            if _index_copy(kv_pool, ids, source, index):
                continue
        for span in spans:
            first, row = ids[span.start], index[span.start]
            kv_pool[first : first + len(span)].copy_(source[row : row + len(span)],
                                                     non_blocking=True)


_MAX_RUN_COPIES = 4


def _index_copy(kv_pool: torch.Tensor, ids: list[int], source: torch.Tensor,
                index: list[int]) -> bool:
    """kv_pool[ids] = source[index] in one launch (rows taken as a slice when `index` counts up
    by one, else gathered first); False when the gather finds no device memory. On CUDA
    kernels.scatter_rows moves them (index_copy_ ran at under 1 TB/s on the H200)."""
    device = kv_pool.device
    first = index[0]
    if index == list(range(first, first + len(index))):
        rows = source[first : first + len(index)]
    else:
        try:
            rows = source.index_select(0, torch.tensor(index, device=device))
        except torch.cuda.OutOfMemoryError:  # copy run by run instead
            return False
    targets = torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)
    if device.type == "cuda" and rows.is_contiguous() and kv_pool.is_contiguous():
        from kvmesh.kernels.scatter_rows import scatter_rows

        scatter_rows(kv_pool, targets, rows)
    else:
        kv_pool.index_copy_(0, targets, rows)
    return True


def _runs_of_both(a: list[int], b: list[int]) -> list[range]:
    """Maximal runs over which both a and b count up by one."""
    return runs(len(a), lambda i: a[i] == a[i - 1] + 1 and b[i] == b[i - 1] + 1)
