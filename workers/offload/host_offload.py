"""KV offload: device pool <-> host tier <-> remote store; the `connector.KvConnector` the engine
uses.

- A cached page evicted from the device pool is copied into the host tier (a CpuTier) before its
  slot is reused.
- Every page that becomes full and cached on the device is written through to the remote store
  (when configured) by a background thread (`store_writer.StoreWriter`), so decode steps never
  wait on the network; when the queue is full the write is dropped and counted.
- On admission (`match`, from `tier_lookup.TierLookup`), the pages after the device-cached
  prefix are looked up by key in the host tier, then in the store; every page is verified
  (namespace, key, token ids, checksum) before use, and a gap ends the prefix. A store that is
  down or answers badly is a miss, never a failed request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol, TypedDict

import torch

from kvmesh.cachestore.codec import encode_page, header_nbytes
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.workers.engine.block_manager import EvictedPage
from kvmesh.workers.engine.outputs import KvEventData
from kvmesh.workers.offload.connector import DevicePages, KvConnector, PageStore
from kvmesh.workers.offload.kv_upload import PageStager
from kvmesh.workers.offload.store_writer import StoreWriter
from kvmesh.workers.offload.tier_lookup import TierLookup
from kvmesh.workers.runner.cuda_host import PinnedRanges

log = logging.getLogger(__name__)


# the store segment made at start on CUDA (an 8K-token Llama-3-8B prefix is 1.07 GB)
_RESERVED_SEGMENT_BYTES = 5 << 28


def max_prefix_nbytes(max_model_len: int, page_size: int, page_nbytes: int) -> int:
    """Encoded bytes of the longest prefix a request can load (every full page but one
    token's), at most _RESERVED_SEGMENT_BYTES: a store segment this large is made and
    page-locked at start (on CUDA); a longer hit makes a larger one then."""
    pages = (max_model_len - 1) // page_size
    return min(pages * (header_nbytes(page_size) + page_nbytes), _RESERVED_SEGMENT_BYTES)


class SegmentHooks(TypedDict, total=False):
    """StoreClient arguments that page-lock its shared-memory segments (and NIXL buffers)."""

    on_new_segment: Callable[[int, int], None]
    on_release_segment: Callable[[int, int], None]


class ShapedPages(DevicePages, Protocol):
    """The device pool with its page layout (`runner.kv_pool.PoolPages`)."""

    page_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    page_nbytes: int


class KvOffload(TierLookup, KvConnector):
    """Called from the engine thread, except the store writer thread it owns. Reads device
    pages through `pool` (demotion, write-through); stages loads with `stager` (`match`, from
    `TierLookup`)."""

    def __init__(
        self,
        pool: DevicePages,
        host_tier_bytes: int,
        stager: PageStager,
        max_prefix_nbytes: int = 0,
    ) -> None:
        super().__init__(stager, CpuTier(host_tier_bytes) if host_tier_bytes else None,
                         PinnedRanges() if stager.is_cuda else None)
        self.pool = pool
        # encoded bytes of the longest prefix a request can load: a store segment of that size
        # is made (and page-locked) when a store is attached, off the first hit's path
        self.max_prefix_nbytes = max_prefix_nbytes
        self.reserving: threading.Thread | None = None  # making that segment
        self._events: list[KvEventData] = []
        self._lock = threading.Lock()  # the events, which the writer thread adds to
        self.writer: StoreWriter | None = None  # sends newly cached pages to the store

    @classmethod
    def for_pool(cls, pool: ShapedPages, host_tier_bytes: int, max_model_len: int,
                 page_size: int) -> KvOffload:
        """An offload for the device pool `pool`, with a stager of its page shape (its checksum
        kernels compiled now where a host tier is used on CUDA)."""
        stager = PageStager(pool.page_shape, pool.dtype, pool.device)
        if pool.device.type == "cuda" and host_tier_bytes:
            stager.warm_up_checksums()
        return cls(pool, host_tier_bytes, stager,
                   max_prefix_nbytes(max_model_len, page_size, pool.page_nbytes))

    def segment_hooks(self) -> SegmentHooks:
        """StoreClient arguments that page-lock its shared-memory segments and NIXL receive
        buffers (on CUDA)."""
        if self.pinned is None:
            return {}
        return {"on_new_segment": self.pinned.register,
                "on_release_segment": self.pinned.unregister}

    def attach_store(self, store: PageStore) -> None:
        """Use `store` as the remote tier and start the writer thread."""
        assert self.store is None, "a store is already attached"
        self.store = store
        self.writer = StoreWriter(store, self.pool, self._emit)
        # on CUDA only: there page-locking a segment is the slow part of making it
        if self.pinned is not None and self.max_prefix_nbytes:
            self.reserving = threading.Thread(target=self._reserve_segment,
                                              name="kv-store-segment", daemon=True)
            self.reserving.start()

    def warm_up_store_loads(self) -> None:
        """On CUDA: staging for store pages not (yet) in page-locked memory (the first pinned
        allocation takes ~0.5 s), and the checksum kernels compiled before the first hit."""
        if self.stager.is_cuda:
            self.stager.warm_up()
            self.stager.warm_up_checksums()

    def _reserve_segment(self) -> None:
        assert self.store is not None
        try:
            self.store.reserve_segment(self.max_prefix_nbytes)
        except Exception:  # the first hit makes one instead
            log.warning("could not reserve a store segment", exc_info=True)

    # ------------------------------------------------------------------ device -> host / store
    def on_evict(self, pages: list[EvictedPage]) -> None:
        """Demote evicted device pages (shallowest first) to the host tier (block manager
        callback). They are stored in that order, so a prefix takes consecutive slots, then
        refreshed deepest first, so the host tier too evicts a prefix from its end."""
        if self.host is None:
            return
        stored_keys = []
        for page in pages:
            if not isinstance(page.tag, Namespace):
                continue
            blob = encode_page(page.tag, page.key, tokens_to_bytes(page.token_ids),
                               self.pool.read_page(page.page_id))
            evicted = self.host.put_many([(page.key, blob)])
            stored = [page.key] if page.key not in {k for k, _ in evicted} else []
            stored_keys += stored
            self._emit(KvEventData("stored", stored, page.parent, "cpu") if stored else None)
            gone = [k for k, _ in evicted if k != page.key]
            self._emit(KvEventData("removed", gone, None, "cpu") if gone else None)
        self.host.touch_many(stored_keys[::-1])

    def accept_pages(self, pages: list[tuple[bytes, bytes]], parent: bytes | None) -> None:
        """Put pages another worker pushed, (key, encoded page) each in prompt order after
        `parent`, into the host tier (which must exist), as the most recently used."""
        assert self.host is not None
        if not pages:
            return
        evicted = {key for key, _ in self.host.put_many(pages)}
        stored: list[bytes] = []  # the leading run announced (a chain after `parent`)
        for key, _ in pages:
            if key in evicted:
                break
            stored.append(key)
        gone = list(evicted - {key for key, _ in pages})
        self._emit(KvEventData("stored", stored, parent, "cpu") if stored else None)
        self._emit(KvEventData("removed", gone, None, "cpu") if gone else None)
        self.host.touch_many(stored[::-1])

    def save(self, ns: Namespace, pages: list[tuple[bytes, list[int], int]]) -> None:
        """Queue host copies of newly cached device pages, (key, token ids, page id) each, for
        the store (`StoreWriter.write_through`); nothing without one."""
        if self.writer is not None:
            self.writer.write_through(ns, pages)

    def flush(self) -> None:
        """Block until every queued store write has been sent or has failed."""
        if self.writer is not None:
            self.writer.flush()

    def wait_store_writes(self, timeout: float) -> bool:
        """Any thread: block until every store write queued so far was sent or failed; False
        after `timeout` seconds (or without a store)."""
        if self.writer is None:
            return False
        return self.writer.wait_for(self.writer.mark(), timeout)

    @property
    def num_store_writes_dropped(self) -> int:
        return self.writer.num_dropped if self.writer is not None else 0

    @property
    def num_store_errors(self) -> int:
        """Failed store lookups and writes."""
        return self._lookup_errors + (self.writer.num_errors if self.writer is not None else 0)

    # ------------------------------------------------------------------ events
    def _emit(self, event: KvEventData | None) -> None:
        if event is not None:
            with self._lock:
                self._events.append(event)

    def pop_events(self) -> list[KvEventData]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def cached_keys(self) -> list[bytes]:
        """The host tier's keys, least recently used first."""
        return self.host.keys_lru_order() if self.host is not None else []

    def close(self) -> None:
        if self.reserving is not None:
            self.reserving.join(timeout=30)  # it may still be adding a segment to the client
        if self.writer is not None:
            self.writer.close()
        if self.store is not None:
            self.store.close()
        if self.host is not None:
            self.host.close()
