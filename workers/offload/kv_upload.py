"""Host tier / store pages -> pages of the device KV pool, fast.

A prefix hit from the host tier or the store is hundreds of pages (an 8K-token Llama-3-8B prefix
is 1 GB). `PageStager.stage_unverified` (on admission) checks every encoded page's header (key,
namespace, shape, token ids) on the calling thread, then moves the payloads to one device tensor
and checks their checksums:

- pages in page-locked memory (the CpuTier pins its pages on CUDA; the store client's
  shared-memory segments are page-locked by the worker), checksummed on the device: a
  `CheckedSend`. The caller may add the pages in batches (the host tier looks them up in
  chunks), each batch's copies queued before its headers are checked, so the DMA starts with
  the first pages. Pages at one stride (consecutive host-tier slots, a store segment) go as one
  2-D copy per run and have their headers compared together (`codec.check_page_headers_at`).
  On CUDA the copies run on a stream of their own, a layer run of every page at a time with an
  event per run (`pool_copies.ArrivingRows`): the step that uses the pages computes its first
  layers while the last ones are still arriving (`kv_pool.LayerRunLoads`);
- other pinned pages (checksums on the host): DMA straight from the source while the bulk pool
  checksums them in place;
- other pages: chunk by chunk on the bulk pool, copied into a pinned staging buffer; each chunk
  goes to the device while the next one is copied, two staging buffers alternating.

On CUDA the checksums are computed on the device, over the rows that arrived
(`kernels.xxh3`): host memory is read once, by the DMA, and what is verified is exactly what
will be used; a load's are queued once the step using it is (`StagedPages.start_checks`), on a
stream of their own. Elsewhere (CPU, or rows that found no room on the device) the bulk pool
checksums in host memory: in place for pinned sources, on the staging copy for the others.
Either way the rows from the first bad page on are never kept: `engine.kv_load` rewinds a
sequence that computed on one.

`pool_copies.upload_pages` (in the step that uses the pages) then moves rows into their pool
slots with device-to-device copies. Checksums and memmove run through ctypes, which releases
the GIL, so the pool's threads really work in parallel (python-xxhash itself holds the GIL). The
first pinned allocation of a size costs ~0.5 s on the H200 host, hence staging buffers
allocated once.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kvmesh.cachestore.bulk_pool import ChunkedTasks, map_chunked
from kvmesh.cachestore.codec import PageCorrupt, check_page_header, checksum_at
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.shm.segments import buffer_address
from kvmesh.workers.offload.page_sends import CheckedSend
from kvmesh.workers.offload.staged_rows import RowChecks, StagedPages, copy_rows, num_leading
from kvmesh.workers.runner.pool_copies import layer_runs

log = logging.getLogger(__name__)
_CHUNK_BYTES = 64 << 20
_VERIFY_TASK_BYTES = 4 << 20  # per checksum task of an in-place send


class PageStager:
    """Owns two pinned (on CUDA) staging buffers of _CHUNK_BYTES, allocated on first use or by
    `warm_up`. Called from one thread (the engine's)."""

    def __init__(self, page_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, device_checksums: bool | None = None) -> None:
        self.page_shape, self.dtype, self.device = page_shape, dtype, device
        self.is_cuda = device.type == "cuda"
        # checksums by kernels.xxh3 over the rows that arrived (default: on CUDA); else on the
        # bulk pool in host memory
        self.device_checksums = self.is_cuda if device_checksums is None else device_checksums
        self.page_nbytes = int(np.prod(page_shape)) * dtype.itemsize
        self.pages_per_chunk = max(1, _CHUNK_BYTES // self.page_nbytes)
        self._buffers: list[torch.Tensor] = []
        self._checksums_warm = False
        self.checks = RowChecks(device)  # device checksums, their stream and the sends' stream
        self.layer_runs = layer_runs(page_shape[0])  # the layer runs sent pages arrive in
        self._free: list[torch.cuda.Event | None] = [None, None]
        # pinned source pages of the last direct send, referenced until its copies are done
        self._keepalive: tuple[torch.cuda.Event | None, list] | None = None

    def warm_up(self) -> None:
        if not self._buffers:
            shape = (self.pages_per_chunk, *self.page_shape)
            self._buffers = [torch.empty(shape, dtype=self.dtype, pin_memory=self.is_cuda)
                             for _ in range(2)]

    def warm_up_checksums(self) -> None:
        """Compile the device checksum kernels for this page size now, not on the first hit
        (a Triton compile takes a few hundred ms)."""
        if self._checksums_warm:
            return
        row = torch.zeros((1, *self.page_shape), dtype=self.dtype, device=self.device)
        if self._verifies_on_device(row):
            self.checks.verify(row, [0]).verify()
        self._checksums_warm = True

    def stage_unverified(self, blobs: Sequence[bytes | memoryview], ns: Namespace,
                         keys: Sequence[bytes], token_ids: Sequence[bytes],
                         is_pinned: bool = False,
                         addresses: Sequence[int | None] | None = None) -> StagedPages:
        """The payloads of the leading pages whose headers check out, as rows of one tensor
        [n, *page_shape] on the device, and `verify()`, which waits for their checksums and
        says how many leading rows are good (a page that fails ends the prefix). Meanwhile the
        caller may queue work that uses the rows, as long as it keeps nothing computed from rows
        past that count. `is_pinned`: the blobs lie in page-locked memory (the CpuTier pins on
        CUDA), so each payload goes to the device straight from there, with no staging copy,
        and is checksummed there or, without device checksums, in place. `addresses`: where
        each blob lies, where the caller knows it (saves asking each buffer). The blobs must
        stay unchanged until `verify()` returns (they are referenced until then); if this
        raises, the copies are waited for first."""
        try:
            return self._stage(blobs, ns, keys, token_ids, is_pinned, addresses)
        except BaseException:
            self.synchronize()
            raise

    def synchronize(self) -> None:
        """Wait for every copy queued so far (they no longer read their sources)."""
        self.checks.synchronize()

    def _stage(self, blobs: Sequence[bytes | memoryview], ns: Namespace, keys: Sequence[bytes],
               token_ids: Sequence[bytes], is_pinned: bool,
               addresses: Sequence[int | None] | None) -> StagedPages:
        if is_pinned:  # copies queued first, headers checked meanwhile
            send = self.open_send(ns, len(blobs))
            if send is not None:
                send.add(blobs, keys, token_ids, addresses)
                return send.close()
        sources = list(self._checked_sources(blobs, ns, keys, token_ids))
        out = self._allocate(len(sources))
        on_device = self._verifies_on_device(out)
        if is_pinned:
            return StagedPages.verified(self._send_pinned(out, sources, blobs))
        self.warm_up()
        num_ok = 0
        for c, start in enumerate(range(0, len(sources), self.pages_per_chunk)):
            chunk = sources[start : start + self.pages_per_chunk]
            buf = c % 2
            event = self._free[buf]
            if event is not None:
                event.synchronize()  # this buffer's last upload has left it
            staging = self._buffers[buf]
            ok = self._copy_and_verify(staging, chunk, verify=not on_device)
            n = num_leading(ok)
            out[start : start + n].copy_(staging[:n], non_blocking=True)
            if self.is_cuda:
                self._free[buf] = torch.cuda.Event()
                self._free[buf].record()
            num_ok += n
            if n < len(chunk):
                break
        if on_device:
            return self.checks.verify(out[:num_ok], [c for _, c in sources[:num_ok]], blobs)
        return StagedPages.verified(out[:num_ok])

    def _allocate(self, num_rows: int) -> torch.Tensor:
        shape = (num_rows, *self.page_shape)
        try:
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        except torch.cuda.OutOfMemoryError:  # no room beside the pool: stay in pinned memory
            return torch.empty(shape, dtype=self.dtype, pin_memory=self.is_cuda)

    def _checked_sources(self, blobs: Sequence[bytes | memoryview], ns: Namespace,
                         keys: Sequence[bytes], token_ids: Sequence[bytes]
                         ) -> Iterator[tuple[int, int]]:
        """(payload address, recorded checksum) of the leading pages whose headers check out;
        each address stays valid while its blob is referenced."""
        for i, blob in enumerate(blobs):
            try:
                payload, checksum = check_page_header(blob, ns, keys[i], token_ids[i])
            except PageCorrupt:
                return
            if payload.nbytes != self.page_nbytes:
                return
            yield buffer_address(payload)[0], checksum

    def open_send(self, ns: Namespace, num_rows: int) -> CheckedSend | None:
        """Up to `num_rows` pages sent straight from page-locked memory (or, without CUDA, any
        memory) and checksummed on the device, added in as many batches as the caller likes
        (`CheckedSend`), so the first pages' copies run while the next ones are fetched. None
        where that does not apply: checksums on the host, another page size, or no room on
        the device."""
        if ns.page_nbytes != self.page_nbytes or not self._checks_on_device():
            return None
        try:
            out = torch.empty((num_rows, *self.page_shape), dtype=self.dtype, device=self.device)
        except torch.cuda.OutOfMemoryError:  # no room beside the pool: the caller stages
            return None  # otherwise (into page-locked memory, checked there)
        self.wait_sent()  # the previous send checked on the host has read its pages
        stream = None
        if self.is_cuda:  # copies on a stream of their own: the step may start on early layers
            if self.checks.copy_stream is None:
                self.checks.copy_stream = torch.cuda.Stream(self.device)
            stream = self.checks.copy_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))  # out's last users
            out.record_stream(stream)
        return CheckedSend(out, ns, self.checks, self.layer_runs, stream)

    def _verifies_on_device(self, out: torch.Tensor) -> bool:
        """Checksums computed on the device, over the rows of `out` once they have arrived."""
        return out.device.type == self.device.type and self._checks_on_device()

    def _checks_on_device(self) -> bool:
        if not self.device_checksums:
            return False
        from kvmesh.kernels.xxh3 import (
            MIN_NBYTES,  # needs Triton: only when device checksums are on
        )

        return self.page_nbytes % 8 == 0 and self.page_nbytes >= MIN_NBYTES

    def _send_pinned(self, out: torch.Tensor, sources: list[tuple[int, int]],
                     blobs: Sequence[bytes | memoryview]) -> torch.Tensor:
        """Checksums on the host: the pool checksums the pinned payloads in place (a few MB per
        task, all queued at once) while this thread queues every page's copy to the device
        (asynchronous, the source being pinned): `out` may receive a page that then fails its
        checksum, but rows from the first bad page on are never returned, so nothing unverified
        is used."""
        self.wait_sent()  # the previous direct send has read its pages
        row = self.page_nbytes

        def verify(indices: range) -> list[bool]:
            return [checksum_at(sources[i][0], row) == sources[i][1] for i in indices]

        num_ok = 0
        with ChunkedTasks(verify, len(sources), len(sources) * row, _VERIFY_TASK_BYTES) as tasks:
            copy_rows(out, [address for address, _ in sources], row, self.is_cuda)
            for _, ok in tasks:
                n = num_leading(ok)
                num_ok += n
                if n < len(ok):
                    break
        event = None
        if self.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._keepalive = (event, list(blobs))
        return out[:num_ok]

    def wait_sent(self) -> None:
        """Block until the last in-place send has read its source pages (then they may change)."""
        if self._keepalive is not None:
            event = self._keepalive[0]
            if event is not None:
                event.synchronize()
            self._keepalive = None

    def _copy_and_verify(self, staging: torch.Tensor, chunk: list[tuple[int, int]],
                         verify: bool) -> list[bool]:
        """Copy the chunk's payloads into `staging` on the pool, checksumming each copy if
        `verify` (else every page counts as good here: it is verified on the device)."""
        base, row = staging.data_ptr(), self.page_nbytes

        def work(indices: range) -> list[bool]:
            ok = []
            for i in indices:
                address, recorded = chunk[i]
                ctypes.memmove(base + i * row, address, row)
                ok.append(not verify or checksum_at(base + i * row, row) == recorded)
            return ok

        return map_chunked(work, len(chunk), len(chunk) * row)
