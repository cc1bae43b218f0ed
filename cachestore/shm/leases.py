"""Server side of mapped GetPages: pages read in place from the server's shared arenas.

A store server's CpuTier keeps its pages in files in /dev/shm (cachestore/tiers/slots.py). A
same-host client that accepts mapped pages gets, instead of a copy, where each page lies: arena
file, offset, size. The client maps the arena (cachestore/shm/maps.py) and reads (or DMAs) the
page itself, so a hit moves its bytes once, not twice.

A slot is reused only once nothing holds its page, so a lease here is simply the page views kept
referenced: until the client calls ReleasePages, or `ttl_s` after the reply, no page of the
lease is overwritten even if the tier drops it meanwhile. The client checks every page it read
(header, key, token ids, checksum) and treats a lease it could not finish within the TTL as a
miss. Mapped replies are all or nothing: when any found page is elsewhere (disk, Redis, a page
stored outside the arenas) the caller answers through the client's segment or inline instead.

Trust: only same-host peers are offered this, and only they can open the files (mode 0600, the
server's user), who could read the server's memory anyway.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.v1 import store_pb2

MAX_LEASES = 1024  # outstanding; past it gets are answered through segments until some end


class MappedLeases:
    """Grants and ends leases; thread-safe. Expired leases are dropped on every call."""

    def __init__(self, tier: CpuTier, ttl_s: float, max_leases: int = MAX_LEASES,
                 lease_ids: Iterator[int] | None = None) -> None:
        """`lease_ids`: where ids come from, when another lease table shares ReleasePages."""
        self.tier = tier
        self.ttl_s = ttl_s
        self._max_leases = max_leases
        self._lock = threading.Lock()
        self._leases: OrderedDict[int, tuple[float, list]] = OrderedDict()  # id -> (end, pages)
        self._ids = lease_ids if lease_ids is not None else itertools.count(1)
        self.num_granted = 0

    def mapped_header(self, keys: Sequence[bytes], blobs: Sequence[bytes | memoryview | None],
                      peer: str) -> store_pb2.GetPagesHeader | None:
        """The reply header locating every found page (`blobs`, by key) in the tier's arenas,
        under a new lease; None when a page lies elsewhere, the peer is not on this host, or
        MAX_LEASES leases are outstanding."""
        found = [blob for blob in blobs if blob is not None]
        if not found or not segments.is_local_peer(peer):
            return None
        found_keys = [key for key, blob in zip(keys, blobs, strict=True) if blob is not None]
        places = self.tier.locate_many(found, found_keys)
        if None in places:
            return None
        arenas: dict[str, int] = {}
        mapped = store_pb2.MappedPages()
        for name, _, arena_nbytes in places:  # type: ignore[misc]  # no None left
            if name not in arenas:
                arenas[name] = len(arenas)
                mapped.arena_names.append(name)
                mapped.arena_nbytes.append(arena_nbytes)
        mapped.page_arenas.extend(arenas[name] for name, _, _ in places)  # type: ignore[misc]
        lease_id = self._grant(found)
        if lease_id is None:
            return None
        mapped.lease_id = lease_id
        mapped.lease_ms = int(self.ttl_s * 1000)
        return store_pb2.GetPagesHeader(
            is_found=[blob is not None for blob in blobs],
            page_nbytes=[memoryview(blob).nbytes for blob in found],
            page_offsets=[offset for _, offset, _ in places],  # type: ignore[misc]
            mapped=mapped,
        )

    def _grant(self, pages: list) -> int | None:
        """A new lease on `pages`, or None when the table is full (a live lease never ends
        early: its client trusts it until its time is up)."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if len(self._leases) >= self._max_leases:
                return None
            lease_id = next(self._ids)
            self.num_granted += 1
            self._leases[lease_id] = (now + self.ttl_s, pages)
        return lease_id

    def release(self, lease_ids: Sequence[int]) -> int:
        """End these leases; returns how many were still held."""
        with self._lock:
            self._expire(time.monotonic())
            return sum(self._leases.pop(i, None) is not None for i in lease_ids)

    @property
    def num_leases(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._leases)

    def close(self) -> None:
        with self._lock:
            self._leases.clear()

    def _expire(self, now: float) -> None:
        while self._leases:
            lease_id, (end, _) = next(iter(self._leases.items()))
            if end > now:
                return
            del self._leases[lease_id]
