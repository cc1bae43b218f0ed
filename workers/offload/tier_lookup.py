"""The connector's scheduler side over the host tier and the store: `TierLookup.match` looks
the pages after a sequence's device-cached prefix up in the host tier, then in the store, and
stages them towards the device (`kv_upload.PageStager`); the load's `PageTransfer` waits for
their copies and checks, keeps the pages that passed, drops a bad one from its tier and ends
store leases. A store that is down or answers badly is a miss, never a failed request.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass

import torch

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.shm.page_lease import PageLease
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.workers.engine.kv_load import KvLoad, PageTransfer, SchedulerConnector
from kvmesh.workers.engine.outputs import KvEventData
from kvmesh.workers.engine.sequence import Sequence
from kvmesh.workers.offload.connector import PageStore
from kvmesh.workers.offload.kv_upload import PageStager
from kvmesh.workers.offload.staged_rows import StagedPages
from kvmesh.workers.runner.cuda_host import PinnedRanges

log = logging.getLogger(__name__)


class _Fetched:
    """Pages fetched from a tier (encoded, None where absent), and the store lease they lie in,
    if any, to release once they have been copied out."""

    def __init__(self, pages: list, is_pinned: bool = False,
                 addresses: list[int | None] | None = None,
                 lease: PageLease | None = None) -> None:
        self.pages = pages
        self.addresses = addresses  # of each page, where the tier knows it
        self.is_pinned = is_pinned  # the pages lie in page-locked memory
        self._lease = lease

    def leading(self) -> list:
        """The pages before the first absent one (the others are forgotten)."""
        self.pages = _leading(self.pages)
        return self.pages

    def is_valid(self) -> bool:
        """After reading the pages: false when their memory may have been reused meanwhile."""
        return self._lease is None or self._lease.is_valid()

    def report_bad(self, keys: list[bytes]) -> None:
        if self._lease is not None:
            self._lease.report_bad(keys)

    def release(self) -> None:
        """End the lease (once): the pages' memory may then be reused."""
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()


def _leading(pages: list) -> list:
    return pages[: pages.index(None)] if None in pages else pages


@dataclass
class _LoadPart:
    """The pages one tier gave a lookup: what was fetched, staged, and under which keys."""

    name: str
    fetched: _Fetched
    staged: StagedPages
    keys: list[bytes]


class _TierTransfer(PageTransfer):
    """The copies and checks of the parts one `match` staged, from one or two tiers."""

    def __init__(self, lookup: TierLookup, parts: list[_LoadPart]) -> None:
        self.lookup, self.parts = lookup, parts

    def start_checks(self) -> None:
        for part in self.parts:
            part.staged.start_checks()

    def wait(self) -> int:
        return self.lookup._wait_parts(self.parts)


_FIRST_CHUNK_PAGES = 16  # host-tier lookups: the first chunk, then each as long as all before


class TierLookup(SchedulerConnector):
    """`KvOffload`'s base: prefix lookups and their staging. Engine thread only. Reads the
    tiers it is given (the store once attached), and drops bad pages from them."""

    def __init__(self, stager: PageStager, host: CpuTier | None,
                 pinned: PinnedRanges | None) -> None:
        self.stager = stager
        self.host = host
        self.store: PageStore | None = None  # set by `attach_store`
        # the store client's segments and NIXL receive buffers, page-locked: hits go by DMA
        self.pinned = pinned
        self._lookup_errors = 0

    @abstractmethod
    def _emit(self, event: KvEventData | None) -> None:
        """Queue a KV event of the tiers (a bad page dropped from the host tier)."""

    def match(self, seq: Sequence, num_device_pages: int, max_pages: int) -> KvLoad | None:
        """Device copies (kv_upload.PageStager) of the pages after the device-cached prefix:
        host tier first, then the store; the first missing or bad page ends it. The copies and
        their checksums may still be running: the load's `wait()` waits for them, keeps the
        pages that passed, drops bad ones from their tier and ends store leases."""
        if self.host is None and self.store is None:
            return None
        ns = seq.namespace
        keys = seq.full_page_keys(max_pages)[num_device_pages:]
        ps = ns.page_size
        data = seq.token_bytes(num_device_pages * ps, max_pages * ps)
        page_tokens = [data[i * 4 * ps : (i + 1) * 4 * ps] for i in range(len(keys))]
        payloads: list[object] = []  # a runner.pool_copies.StagedRow each
        tiers: list[str] = []
        parts: list[_LoadPart] = []
        for name in ("cpu", "store"):
            start = len(payloads)
            if start == len(keys) or (self.host if name == "cpu" else self.store) is None:
                continue
            fetched = _Fetched([])
            try:
                if name == "cpu":
                    fetched, staged = self._host_stage(ns, keys[start:], page_tokens[start:])
                else:
                    fetched = self._store_get(keys[start:])
                    if not fetched.leading():  # the store holds not even the first one
                        fetched.release()
                        break
                    staged = self._stage(fetched, ns, keys[start:], page_tokens[start:])
            except Exception:  # e.g. no device memory: a miss, not a failed step
                log.warning("loading pages from the %s tier failed", name, exc_info=True)
                fetched.release()
                break
            parts.append(_LoadPart(name, fetched, staged,
                                   keys[start : start + len(fetched.pages)]))
            source = staged.arriving or staged.rows  # (arriving: a run of layers at a time)
            payloads.extend((source, i) for i in range(len(staged.rows)))
            tiers.extend([name] * len(staged.rows))
        if not payloads:
            self._wait_parts(parts)
            return None
        return KvLoad(num_device_pages, payloads, tiers, _TierTransfer(self, parts))

    def _host_stage(self, ns: Namespace, keys: list[bytes], page_tokens: list[bytes]
                    ) -> tuple[_Fetched, StagedPages]:
        """The host tier's leading pages of `keys`, staged. Where they go straight to the device
        and are checksummed there, they are looked up in chunks growing from
        _FIRST_CHUNK_PAGES, each chunk's copies queued before the next is looked up, so the
        copies start early and run while the rest is looked up and checked."""
        assert self.host is not None
        send = None
        if self.host.is_pinned or not self.stager.is_cuda:
            # rows for the pages the tier holds now: only this thread stores into it, so none
            # of them goes before they are fetched (one that changes fails its checks)
            num_held = self.host.count_leading(keys)
            if not num_held:
                return _Fetched([]), StagedPages.verified(torch.empty(0))
            keys, page_tokens = keys[:num_held], page_tokens[:num_held]
            send = self.stager.open_send(ns, num_held)
        if send is None:
            fetched = self._host_get(keys)
            return fetched, self._stage(fetched, ns, keys, page_tokens)
        pages: list[bytes | memoryview] = []
        try:
            while len(pages) < len(keys):
                start = len(pages)
                end = min(len(keys), start + max(_FIRST_CHUNK_PAGES, start))
                chunk, where = self.host.get_leading_addressed(keys[start:end])
                chunk = _leading(chunk)
                pages += chunk
                if send.add(chunk, keys[start : start + len(chunk)],
                            page_tokens[start : start + len(chunk)],
                            where[: len(chunk)]) < end - start:
                    break  # a gap, or a bad page: the store goes on from the first row lost
            return _Fetched(pages, is_pinned=True), send.close()
        except BaseException:
            self.stager.synchronize()  # no copy still reads the pages once this has raised
            raise

    def _stage(self, fetched: _Fetched, ns: Namespace, keys: list[bytes],
               page_tokens: list[bytes]) -> StagedPages:
        """The fetched pages before the first absent one, staged in one go."""
        blobs = fetched.leading()
        n = len(blobs)
        return self.stager.stage_unverified(
            blobs, ns, keys[:n], page_tokens[:n], is_pinned=fetched.is_pinned,
            addresses=fetched.addresses[:n] if fetched.addresses else None)

    def _wait_parts(self, parts: list[_LoadPart]) -> int:
        """Wait for the parts' copies and checks; returns how many leading pages passed. Ends
        every lease (after every copy has read its pages, also when this raises) and drops a
        bad page from its tier."""
        try:
            for part in parts:
                part.staged.start_checks()
            counts = [part.staged.verify() for part in parts]  # (waits for the device)
            self.stager.wait_sent()  # a send checked on the host may still be reading its pages
            num_ok, whole = 0, True  # whole: every page so far passed (the prefix goes on)
            for part, n in zip(parts, counts, strict=True):
                if not part.fetched.is_valid():  # read too late: the store may have reused them
                    log.warning("%d pages from the %s tier were read after their lease ended",
                                n, part.name)
                    n = 0
                elif n < len(part.keys):
                    self._drop_bad(part.name, part.keys[n], part.fetched)
                if whole:
                    num_ok += n
                whole = whole and n == len(part.staged.rows)
            return num_ok
        finally:
            for part in parts:
                part.fetched.release()

    def _drop_bad(self, tier: str, key: bytes, fetched: _Fetched) -> None:
        """A page that failed its check (while still leased, if it is): out of the host tier
        here; the store is told, checks it itself and drops it (pages it copied for us it had
        checked already)."""
        log.warning("dropping a bad page from the %s tier", tier)
        if tier == "cpu" and self.host is not None:
            if self.host.delete_many([key]):
                self._emit(KvEventData("removed", [key], None, "cpu"))
        else:
            fetched.report_bad([key])

    def _host_get(self, keys: list[bytes]) -> _Fetched:
        assert self.host is not None
        pages, addresses = self.host.get_leading_addressed(keys)
        return _Fetched(pages, is_pinned=self.host.is_pinned, addresses=addresses)

    def _store_get(self, keys: list[bytes]) -> _Fetched:
        """The leading pages the store holds, in one round trip: read where the store keeps
        them, or through a shared-memory segment, when the store is on this host; else READ by
        NIXL into the client's registered (page-locked on CUDA) buffers. Either way unchecked:
        the stager checks every page (header on the host, checksum on the device on CUDA)."""
        assert self.store is not None
        try:
            # mapped: read in place in the store's own memory; the stager checks every page
            lease = self.store.get_pages_leased(keys, prefix_only=True, mapped=True)
            pinned = self._is_pinned(lease)
            if lease.valid_until is not None and self.pinned is not None and not pinned:
                # store memory not page-locked yet (that goes on in the background): the
                # store's copy into our page-locked segment is faster than staging from it
                lease.release()
                lease = self.store.get_pages_leased(keys, prefix_only=True)
                pinned = self._is_pinned(lease)
            return _Fetched(lease.pages, pinned, lease.addresses, lease)
        except Exception as exc:  # down, timed out, unauthenticated: a miss
            self._lookup_errors += 1
            log.warning("store lookup failed, treating as a miss: %s", exc)
            return _Fetched([])

    def _is_pinned(self, lease: PageLease) -> bool:
        """The lease's pages lie in memory page-locked by this process: a store segment or
        arena, or a NIXL receive buffer (both page-locked through `segment_hooks`); never
        received frames (no regions)."""
        return (bool(lease.regions) and self.pinned is not None
                and all(self.pinned.covers(*region) for region in lease.regions))
