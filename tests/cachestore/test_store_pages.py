"""PageAccess (the key-level page calls) shares TieredStore's TierChain: pages between two tiers
are found, a tier that is down is counted, puts cascade evictions, corrupt pages are dropped."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvmesh.cachestore.codec import encode_page, header_nbytes
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.cachestore.store.page_access import PageAccess
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.base import TierUnavailable
from kvmesh.cachestore.tiers.cpu import CpuTier

NS = Namespace("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
               page_size=4)  # page payload: 512 bytes
PAGE_BLOB_NBYTES = header_nbytes(4) + 512


def encoded(pages, num_pages: int) -> list[tuple[bytes, bytes]]:
    tokens = pages.tokens(4 * num_pages)
    keys = NS.page_keys(tokens)
    payloads = pages.payloads(NS, num_pages)
    return [(key, encode_page(NS, key, tokens_to_bytes(tokens[4 * i : 4 * i + 4]), payloads[i]))
            for i, key in enumerate(keys)]


class DownTier(CpuTier):
    """A CPU tier whose backend is gone while `is_down` is set."""

    name = "redis"
    is_down = False

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        if self.is_down:
            raise TierUnavailable("down")
        return super().contains_many(keys)


class SlowPutTier(CpuTier):
    """A CPU tier whose put_many waits on `release`, so demotions stay in flight."""

    name = "disk"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered, self.release = threading.Event(), threading.Event()

    def put_many(self, pages):
        self.entered.set()
        self.release.wait(10)
        return super().put_many(pages)


def test_put_cascades_evictions_and_keys_read_back(pages):
    top = CpuTier(capacity_bytes=2 * PAGE_BLOB_NBYTES, pin_memory=False)
    below = CpuTier(capacity_bytes=8 * PAGE_BLOB_NBYTES, pin_memory=False)
    store = TieredStore([top, below])
    access = PageAccess(store)
    blobs = encoded(pages, 4)
    keys = [key for key, _ in blobs]
    assert access.put(blobs) == 4
    assert access.put(blobs) == 0  # present: a no-op
    assert top.keys_lru_order() == keys[2:] and below.keys_lru_order() == keys[:2]
    assert access.has(keys) == [True] * 4
    assert access.get(keys) == [blob for _, blob in blobs]
    assert access.delete([*keys[:1], bytes(16)]) == 1
    assert access.get(keys, prefix_only=True) == [None] * 4
    assert store.lookup(NS, pages.tokens(16)).num_tokens == 0


def test_a_tier_that_is_down_is_a_miss_and_counted(pages):
    down = DownTier(capacity_bytes=8 * PAGE_BLOB_NBYTES, pin_memory=False)
    store = TieredStore([CpuTier(capacity_bytes=8 * PAGE_BLOB_NBYTES, pin_memory=False), down])
    access = PageAccess(store)
    keys = [key for key, _ in encoded(pages, 2)]
    down.is_down = True
    assert access.has(keys) == [False, False]
    stats = {s.name: s for s in store.stats()}
    assert (stats["redis"].errors, stats["redis"].is_available) == (1, False)
    down.is_down = False
    assert access.has(keys) == [False, False]
    assert store.stats()[1].is_available


def test_a_page_being_demoted_is_still_found(pages):
    top = CpuTier(capacity_bytes=PAGE_BLOB_NBYTES, pin_memory=False)
    slow = SlowPutTier(capacity_bytes=8 * PAGE_BLOB_NBYTES, pin_memory=False)
    access = PageAccess(TieredStore([top, slow]))
    (first, second) = encoded(pages, 2)
    assert access.put([first]) == 1
    putter = threading.Thread(target=access.put, args=([second],))
    putter.start()  # evicts `first` from the top tier; the slow tier has not stored it yet
    try:
        assert slow.entered.wait(10)
        assert access.has([first[0]]) == [True]
        assert access.get([first[0]]) == [first[1]]
    finally:
        slow.release.set()
        putter.join(10)
    assert slow.keys_lru_order() == [first[0]]


def test_a_corrupt_page_reads_as_a_miss_is_dropped_and_counted(pages):
    tier = CpuTier(capacity_bytes=8 * PAGE_BLOB_NBYTES, pin_memory=False)
    store = TieredStore([tier])
    access = PageAccess(store)
    key, blob = encoded(pages, 1)[0]
    bad = bytearray(blob)
    bad[-1] ^= 0xFF
    tier.put_many([(key, bytes(bad))])  # behind the store's back
    assert access.get([key]) == [None]
    assert access.has([key]) == [False]
    assert store.stats()[0].errors == 1
