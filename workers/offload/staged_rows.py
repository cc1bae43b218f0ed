"""Rows staged on the device for loaded pages: copying payloads into them (`copy_rows`) and
checking them against their recorded checksums (`RowChecks`), with the result `StagedPages`.
Used by the sends (`page_sends`) and the stager (`kv_upload`), which import this, not each
other.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Sequence

import torch

from kvmesh.workers.runner.cuda_host import copy_async, cudart
from kvmesh.workers.runner.pool_copies import ArrivingRows

log = logging.getLogger(__name__)


def copy_rows(out: torch.Tensor, addresses: list[int], row: int, is_cuda: bool) -> None:
    """out[i] = the `row` bytes at addresses[i], queued on the current stream: one
    cudaMemcpyAsync each on CUDA (where the runtime is at hand; also into pinned host rows)."""
    lib = cudart() if is_cuda else None
    if lib is not None:
        base = out.data_ptr()
        copy_async(lib, [(base + i * row, a) for i, a in enumerate(addresses)], row,
                   torch.cuda.current_stream(out.device))
    elif addresses:
        dst = list(out[: len(addresses)].view(len(addresses), -1).view(torch.uint8).unbind())
        src = [torch.frombuffer((ctypes.c_char * row).from_address(a), dtype=torch.uint8)
               for a in addresses]
        torch._foreach_copy_(dst, src, non_blocking=True)


class RowChecks:
    """Checksums of staged rows computed on the device (kernels.xxh3). Owns, on CUDA, the
    stream they run on and the stream sends copy on (`copy_stream`, made by the stager)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._verify_stream: torch.cuda.Stream | None = None
        self.copy_stream: torch.cuda.Stream | None = None  # sends checked on the device

    def synchronize(self) -> None:
        """Wait for every copy queued so far (they no longer read their sources)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
            if self.copy_stream is not None:
                self.copy_stream.synchronize()

    def verify(self, rows: torch.Tensor, recorded: list[int], sources: object = None,
               after: torch.cuda.Event | None = None) -> StagedPages:
        """The rows, and how many leading ones match their recorded checksums: computed on the
        device once they have arrived, on a stream of its own on CUDA, so work queued after the
        copies (moving the rows into the pool, the forward) does not wait for the checksums.
        `after`: the copies ran on another stream, this event follows the last one."""
        if not recorded:
            return StagedPages(rows, 0)
        from kvmesh.kernels.xxh3 import as_int64, xxh3_64_rows

        want = torch.tensor([as_int64(c) for c in recorded], dtype=torch.int64,
                            pin_memory=rows.is_cuda)
        ready = None
        stream = None
        if rows.is_cuda:
            if self._verify_stream is None:
                self._verify_stream = torch.cuda.Stream(rows.device)
            stream = self._verify_stream
            if after is not None:
                stream.wait_event(after)
            else:
                stream.wait_stream(torch.cuda.current_stream(rows.device))  # after the copies
            rows.record_stream(stream)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            bad = xxh3_64_rows(rows) != want.to(rows.device, non_blocking=True)
            index = torch.arange(len(recorded), device=rows.device)
            num_ok = torch.where(bad, index, len(recorded)).min()
            if stream is not None:  # read back on this stream: verify() need not wait for the step
                count = torch.empty(1, dtype=torch.int64, pin_memory=True)
                count.copy_(num_ok.view(1), non_blocking=True)
                num_ok = count
                ready = torch.cuda.Event()
                ready.record(stream)
        return StagedPages(rows, num_ok, sources, ready)

    def verify_or_none(self, rows: torch.Tensor, recorded: list[int], sources: object,
                       after: torch.cuda.Event | None) -> StagedPages:
        """`verify` for checks queued late, where raising would leave a load unchecked: if
        queueing them fails (e.g. no device memory), every row counts as bad, once the copies
        are done (they no longer read the sources)."""
        try:
            return self.verify(rows, recorded, sources, after)
        except Exception:
            log.warning("checking %d staged pages failed; they are dropped", len(rows),
                        exc_info=True)
            self.synchronize()
            return StagedPages(rows, 0)


class StagedPages:
    """Rows staged on the device for the pages whose headers checked out, and how many of them
    (leading) also match their checksums: known at once, or a tensor that `verify` waits for
    (`ready`: the event of the stream computing it and copying it to page-locked memory), or
    checks still to queue (`deferred`; `start_checks` queues them). Keeps the source blobs
    referenced until then (copies may still read them). `arriving`: the rows as they arrive a
    layer run at a time, for the step that uses them."""

    def __init__(self, rows: torch.Tensor, num_ok: torch.Tensor | int,
                 sources: object = None, ready: torch.cuda.Event | None = None) -> None:
        self.rows = rows
        self.arriving: ArrivingRows | None = None  # set while the rows are still arriving
        self._num_ok = num_ok
        self._sources = sources
        self._ready = ready
        # checks to queue first: (who runs them, recorded checksums, event after the copies)
        self._deferred: tuple[RowChecks, list[int], torch.cuda.Event | None] | None = None

    @classmethod
    def verified(cls, rows: torch.Tensor) -> StagedPages:
        return cls(rows, len(rows))

    @classmethod
    def deferred(cls, rows: torch.Tensor, checks: RowChecks, recorded: list[int],
                 sources: object, after: torch.cuda.Event | None) -> StagedPages:
        """Rows whose checksums `checks` queues when first needed (`start_checks`)."""
        staged = cls(rows, 0, sources)
        staged._deferred = (checks, recorded, after)
        return staged

    def start_checks(self) -> None:
        """Queue the checksums, if that waited until now (does not raise)."""
        if self._deferred is not None:
            (checks, recorded, after), self._deferred = self._deferred, None
            started = checks.verify_or_none(self.rows, recorded, self._sources, after)
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

