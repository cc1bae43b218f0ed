"""A batch of staged pages and the sends that fill it (kv_upload.PageStager makes both).

- `CheckedSend`: pages added batch by batch, copied to the rows of one device tensor, headers
  checked on the host while the copies run, checksums on the device;
- `StagedPages`: the rows, and how many leading ones passed (known, or still being computed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from kvmesh.cachestore.codec import (
    PageCorrupt,
    check_page_header,
    check_page_headers_at,
    page_nbytes,
    payload_offset,
)
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.shm.segments import buffer_address
from kvmesh.workers.runner.cuda_host import address_runs, copy_rows_async, cudart
from kvmesh.workers.runner.pool_copies import ArrivingRows

if TYPE_CHECKING:
    from kvmesh.workers.offload.kv_upload import PageStager


class CheckedSend:
    """Pages copied to the rows of one device tensor batch by batch, their headers checked on
    the host while the copies run, their checksums computed on the device in one pass over all
    rows: at `close` without CUDA; on CUDA once the load settles (`StagedPages.start_checks`).
    Every page of the right size has its payload's copy queued first (a page's payload lies at
    a fixed offset for its namespace); the first page whose header fails ends the send (later
    batches add nothing). The batches' blobs stay referenced until the checksums are in.

    On CUDA the copies run on `stream`, each batch's runs of pages at one stride a run of
    layers at a time (`PageStager.segments`; lone pages whole, first), an event recorded after
    each run of layers: the rows come back as `pool_copies.ArrivingRows`, so a step can compute
    its first layers while the last ones of the last batch are still on their way."""

    def __init__(self, stager: PageStager, out: torch.Tensor, ns: Namespace,
                 stream: torch.cuda.Stream | None = None) -> None:
        self.stager, self.out, self.ns, self.stream = stager, out, ns, stream
        self.recorded: list[int] = []  # checksums the good headers record, one per row
        self.sources: list[Sequence[bytes | memoryview]] = []
        self.is_open = True  # no page has failed yet
        self._num_copied = 0  # pages whose copies were queued without a good header
        self.events = [torch.cuda.Event() for _ in stager.segments] if stream else []

    def add(self, blobs: Sequence[bytes | memoryview], keys: Sequence[bytes],
            token_ids: Sequence[bytes], addresses: Sequence[int | None] | None = None) -> int:
        """Queue the copies of the next pages and check their headers; returns how many got
        rows (all of them, unless one failed or the rows ran out). Pages that lie at one
        stride (consecutive host-tier slots, a store segment) go as one copy per run of layers
        and have their headers checked together (`codec.check_page_headers_at`)."""
        if not self.is_open:
            return 0
        row = len(self.recorded)
        blobs = blobs[: len(self.out) - row]
        nbytes = page_nbytes(self.ns)
        sized = num_leading([memoryview(blob).nbytes == nbytes for blob in blobs])
        known = addresses[:sized] if addresses is not None else [None] * sized
        starts = [a if a is not None else buffer_address(blob)[0]
                  for a, blob in zip(known, blobs, strict=False)]
        runs = address_runs(starts, nbytes)
        self._copy(row, [start + payload_offset(self.ns) for start in starts], runs)
        self.sources.append(blobs)
        tokens = b"".join(token_ids[:sized])
        step = len(tokens) // sized if sized else 0
        for first, count, pitch in runs:
            end = first + count
            if count > 1:
                sums = check_page_headers_at(starts[first], pitch, count, self.ns,
                                             keys[first:end], tokens[first * step : end * step])
            else:
                try:
                    sums = [check_page_header(blobs[first], self.ns, keys[first],
                                              token_ids[first])[1]]
                except PageCorrupt:
                    sums = []
            self.recorded += sums
            if len(sums) < count:
                break
        added = len(self.recorded) - row
        self._num_copied += sized - added
        self.is_open = added == len(blobs)
        return added

    def _copy(self, row: int, sources: list[int], runs: list[tuple[int, int, int]]) -> None:
        """out[row + i] = the payload at sources[i]: on CUDA on the send's stream, one run of
        layers of every page after another (one 2-D copy per run of pages at one stride)."""
        stager = self.stager
        lib = cudart() if self.stream is not None else None
        if self.stream is None or lib is None:
            with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
                stager._copy_rows(self.out[row:], sources)
                for event in self.events:
                    event.record()
            return
        page = stager.page_nbytes
        layer = page // stager.page_shape[0]
        base = self.out[row:].data_ptr()
        # lone pages whole (one copy each, not one per run of layers), before every event
        copy_rows_async(lib, base, sources, page, [(0, page)], self.stream,
                        [run for run in runs if run[1] == 1])
        copy_rows_async(lib, base, sources, page,
                        [(layers.start * layer, len(layers) * layer)
                         for layers in stager.segments],
                        self.stream, [run for run in runs if run[1] > 1],
                        lambda k: self.events[k].record(self.stream))

    def close(self) -> StagedPages:
        """The rows of the pages whose headers checked out; their checksums computed (without
        CUDA) or to be queued by `StagedPages.start_checks` (CUDA)."""
        stager = self.stager
        if self._num_copied and not self.recorded and self.stream is not None:  # nothing to
            self.stream.synchronize()  # verify: the copies must still leave the sources
        rows = self.out[: len(self.recorded)]
        if not self.events or not len(rows):
            return stager._verify_rows(rows, self.recorded, self.sources)
        # CUDA: the checksums are queued when first needed (settling the load, after the step
        # that uses the rows is queued), on their own stream after the last copy
        recorded, sources, last = self.recorded, self.sources, self.events[-1]
        staged = StagedPages(rows, 0, sources, checks=lambda: stager._checks_or_none(
            rows, recorded, sources, last))
        staged.arriving = ArrivingRows(rows, self.events, stager.segments)
        return staged


class StagedPages:
    """Rows staged on the device for the pages whose headers checked out, and how many of them
    (leading) also match their checksums: known at once, or a tensor that `verify` waits for
    (`ready`: the event of the stream computing it and copying it to page-locked memory), or
    `checks` to queue that first (`start_checks`; it must not raise). Keeps the source blobs
    referenced until then (copies may still read them). `arriving`: the rows as they arrive a
    run of layers at a time, for the step that uses them."""

    def __init__(self, rows: torch.Tensor, num_ok: torch.Tensor | int,
                 sources: object = None, ready: torch.cuda.Event | None = None,
                 checks: Callable[[], StagedPages] | None = None) -> None:
        self.rows = rows
        self.arriving: ArrivingRows | None = None  # set while the rows are still arriving
        self._num_ok = num_ok
        self._sources = sources
        self._ready = ready
        self._checks = checks  # queues the checksums (then num_ok and ready come from it)

    @classmethod
    def verified(cls, rows: torch.Tensor) -> StagedPages:
        return cls(rows, len(rows))

    def start_checks(self) -> None:
        """Queue the checksums, if that waited until now."""
        if self._checks is not None:
            checks, self._checks = self._checks, None
            started = checks()
            self._num_ok, self._ready = started._num_ok, started._ready

    def verify(self) -> int:
        """How many leading rows are good (waits for the copies and checksums once)."""
        self.start_checks()
        if not isinstance(self._num_ok, int):
            if self._ready is not None:  # the count's stream, after the copies and checksums:
                self._ready.synchronize()  # not the work queued since on the caller's stream
            self._num_ok = int(self._num_ok)
        self._sources = None
        return self._num_ok


def num_leading(flags: Sequence[bool]) -> int:
    """How many flags come before the first False (a bad page ends a prefix)."""
    return flags.index(False) if False in flags else len(flags)
