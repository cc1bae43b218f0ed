"""`CheckedSend`: pages added batch by batch, copied to the rows of one device tensor, headers
checked on the host while the copies run, checksums on the device (kv_upload.PageStager opens
one; the rows come back as `staged_rows.StagedPages`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from kvmesh.cachestore.codec import PageCorrupt, check_page_header, page_nbytes, payload_offset
from kvmesh.cachestore.codec_batch import check_page_headers_at
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.shm.segments import buffer_address
from kvmesh.workers.offload.staged_rows import RowChecks, StagedPages, copy_rows, num_leading
from kvmesh.workers.runner.cuda_host import address_runs, copy_rows_async, cudart
from kvmesh.workers.runner.pool_copies import ArrivingRows


class CheckedSend:
    """Pages copied to the rows of one device tensor batch by batch, their headers checked on
    the host while the copies run, their checksums computed on the device in one pass over all
    rows: at `close` without CUDA; on CUDA once the load is waited for (`StagedPages.start_checks`).
    Every page of the right size has its payload's copy queued first (a page's payload lies at
    a fixed offset for its namespace); the first page whose header fails ends the send (later
    batches add nothing). The batches' blobs stay referenced until the checksums are in.

    On CUDA the copies run on `stream`, each batch's runs of pages at one stride a layer run at
    a time (`layer_runs`; lone pages whole, first), an event recorded after each layer run: the
    rows come back as `pool_copies.ArrivingRows`, so a step can compute its first layers while
    the last ones of the last batch are still on their way."""

    def __init__(self, out: torch.Tensor, ns: Namespace, checks: RowChecks,
                 layer_runs: list[range], stream: torch.cuda.Stream | None = None) -> None:
        # out: [num_rows, num_layers, 2, page_size, num_kv_heads, head_dim]
        self.out, self.ns, self.checks, self.stream = out, ns, checks, stream
        self.layer_runs = layer_runs
        self.page_nbytes = out[0].numel() * out.element_size()
        self.is_cuda = checks.device.type == "cuda"
        self.recorded: list[int] = []  # checksums the good headers record, one per row
        self.sources: list[Sequence[bytes | memoryview]] = []
        self.is_open = True  # no page has failed yet
        self._num_copied = 0  # pages whose copies were queued without a good header
        self.events = [torch.cuda.Event() for _ in layer_runs] if stream else []

    def add(self, blobs: Sequence[bytes | memoryview], keys: Sequence[bytes],
            token_ids: Sequence[bytes], addresses: Sequence[int | None] | None = None) -> int:
        """Queue the copies of the next pages and check their headers; returns how many got
        rows (all of them, unless one failed or the rows ran out). Pages that lie at one
        stride (consecutive host-tier slots, a store segment) go as one copy per layer run
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
        """out[row + i] = the payload at sources[i]: on CUDA on the send's stream, one layer
        run of every page after another (one 2-D copy per run of pages at one stride)."""
        lib = cudart() if self.stream is not None else None
        if self.stream is None or lib is None:
            with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
                copy_rows(self.out[row:], sources, self.page_nbytes, self.is_cuda)
                for event in self.events:
                    event.record()
            return
        page = self.page_nbytes
        layer = page // self.out.shape[1]
        base = self.out[row:].data_ptr()
        # lone pages whole (one copy each, not one per layer run), before every event
        copy_rows_async(lib, base, sources, page, [(0, page)], self.stream,
                        [run for run in runs if run[1] == 1])
        copy_rows_async(lib, base, sources, page,
                        [(layers.start * layer, len(layers) * layer)
                         for layers in self.layer_runs],
                        self.stream, [run for run in runs if run[1] > 1],
                        lambda k: self.events[k].record(self.stream))

    def close(self) -> StagedPages:
        """The rows of the pages whose headers checked out; their checksums computed (without
        CUDA) or to be queued by `StagedPages.start_checks` (CUDA)."""
        if self._num_copied and not self.recorded and self.stream is not None:  # nothing to
            self.stream.synchronize()  # verify: the copies must still leave the sources
        rows = self.out[: len(self.recorded)]
        if not self.events or not len(rows):
            return self.checks.verify(rows, self.recorded, self.sources)
        # CUDA: the checksums are queued when first needed (finishing the load, after the step
        # that uses the rows is queued), on their own stream after the last copy
        staged = StagedPages.deferred(rows, self.checks, self.recorded, self.sources,
                                      self.events[-1])
        staged.arriving = ArrivingRows(rows, self.events, self.layer_runs)
        return staged
