"""RemoteTier: a tier backed by another store server, so tiered stores compose across machines.

It speaks the key-level page RPCs (HasPages / GetPages / PutPages / DeletePages), moving encoded
pages by key exactly as any other tier does; the remote server keeps them in its own tiers (with
its own LRU and demotion) and checks each page's header and checksum before storing it. This
store's TieredStore still verifies every page it reads (namespace, token ids, checksum).

The remote store's capacity and evictions are its own: `put_many` returns no evicted pages.
A server that cannot be reached, or answers UNAVAILABLE, raises TierUnavailable (a miss); for
`retry_after_s` after that every call fails at once instead of waiting on a dead or hung server
again, then the next call tries it.

The tier sits below cachestore.rpc, so it is handed its client (`PageClient`: what it calls of
rpc.client.StoreClient) instead of building one; rpc.server.build_tiers does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from kvmesh.cachestore.errors import (
    ProtocolError,
    StoreFull,
    StoreUnavailable,
    TierFull,
    TierUnavailable,
    Unauthenticated,
)
from kvmesh.cachestore.tiers.base import Page, Tier, TierStats


class PageClient(Protocol):
    """The key-level calls of a store client (rpc.client.StoreClient), raising the client
    errors of cachestore.errors."""

    target: str

    def has_pages(self, keys: Sequence[bytes]) -> list[bool]: ...

    def get_pages(self, keys: Sequence[bytes]) -> list[memoryview | None]: ...

    def put_encoded_pages(self, pages: Sequence[tuple[bytes, bytes | memoryview]]) -> int: ...

    def delete_pages(self, keys: Sequence[bytes]) -> int: ...

    def stats(self) -> list[TierStats]: ...

    def close(self) -> None: ...


class RemoteTier(Tier):
    """Thread-safe (one gRPC channel). Owns `client` (closed by `close`), whose timeout bounds
    each call, so a hung remote costs at most that much before it reads as down. Fail-fast is
    this tier's own (`retry_after_s`): give it a client without a circuit breaker."""

    name = "remote"

    def __init__(self, client: PageClient, retry_after_s: float = 2.0) -> None:
        self.target = client.target
        self.retry_after_s = retry_after_s
        self._client = client
        self._stats = TierStats(self.name)
        self._lock = threading.Lock()
        self._down_until = 0.0  # time.monotonic() before which calls fail fast

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        return self._guard(self._client.has_pages, keys)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        if not keys:
            return []
        pages = self._guard(self._client.get_pages, keys)
        hits = sum(page is not None for page in pages)
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += len(pages) - hits
        return list(pages)

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        if pages:
            self._guard(self._client.put_encoded_pages, pages)
        return []

    def delete_many(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        return self._guard(self._client.delete_pages, keys)

    def stats(self) -> TierStats:
        """Hits and misses as seen from here; sizes summed over the remote server's tiers."""
        remote = self._guard(self._client.stats)
        return TierStats(
            self.name,
            used_bytes=sum(s.used_bytes for s in remote),
            capacity_bytes=sum(s.capacity_bytes for s in remote),
            num_pages=sum(s.num_pages for s in remote),
            hits=self._stats.hits,
            misses=self._stats.misses,
            evictions=sum(s.evictions for s in remote),
            errors=self._stats.errors,
            is_available=True,
        )

    def close(self) -> None:
        self._client.close()

    def _guard(self, method, *args):
        if time.monotonic() < self._down_until:
            raise TierUnavailable(f"remote store {self.target} is down; next try in at most "
                                  f"{self.retry_after_s} s")
        try:
            return method(*args)
        except (StoreUnavailable, Unauthenticated, ProtocolError) as exc:
            with self._lock:
                self._stats.errors += 1
                self._down_until = time.monotonic() + self.retry_after_s
            raise TierUnavailable(f"remote store {self.target}: {exc}") from None
        except StoreFull as exc:
            raise TierFull(f"remote store {self.target}: {exc}") from None
