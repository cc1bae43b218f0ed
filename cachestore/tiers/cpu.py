"""Host-memory tier: encoded pages held in process memory, LRU by bytes.

Each page is its own immutable buffer, never reused: eviction only drops the tier's reference,
so a reader that got a page keeps a valid buffer for as long as it holds it (no pin counts
needed, nothing is overwritten under a reader).

With `pin_memory=True` (the default when CUDA is present) each page is copied once into its own
page-locked torch uint8 tensor (`torch.empty(n, dtype=torch.uint8, pin_memory=True)`) so a
host->GPU copy of the payload can run asynchronously at full PCIe speed; `get_many` returns a
memoryview over that tensor's memory, which keeps the tensor alive. Without CUDA pages are
plain `bytes`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from cachestore.errors import InvalidConfig
from cachestore.tiers.base import Tier, TierStats
from cachestore.tiers.lru import LruIndex


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _to_pinned(blob: bytes | memoryview) -> memoryview:
    import torch

    src = memoryview(blob).cast("B")
    host = torch.empty(src.nbytes, dtype=torch.uint8, pin_memory=True)
    host.numpy()[:] = src  # one copy into page-locked memory
    # Read-only, like bytes pages: readers cannot scribble on a stored page. The view keeps
    # the pinned tensor alive.
    return host.numpy().data.toreadonly()


class CpuTier(Tier):
    """Thread-safe host-memory tier. `put_many` returns evicted pages for demotion; a page
    larger than the whole capacity is not stored and is returned as evicted right away."""

    name = "cpu"

    def __init__(self, capacity_bytes: int, pin_memory: bool | None = None) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise InvalidConfig(f"cpu tier capacity_bytes must be a positive int, "
                                f"got {capacity_bytes!r}")
        self.is_pinned = _cuda_available() if pin_memory is None else pin_memory
        self._lock = threading.Lock()
        self._lru = LruIndex(capacity_bytes)
        self._pages: dict[bytes, bytes | memoryview] = {}
        self._stats = TierStats(name=self.name, capacity_bytes=capacity_bytes)

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._pages for key in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        out: list[bytes | memoryview | None] = []
        with self._lock:
            for key in keys:
                blob = self._pages.get(key)
                if blob is None:
                    self._stats.misses += 1
                else:
                    self._lru.touch(key)
                    self._stats.hits += 1
                out.append(blob)
        return out

    def put_many(self, pages: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        evicted: list[tuple[bytes, bytes | memoryview]] = []
        for key, blob in pages:
            nbytes = memoryview(blob).nbytes
            with self._lock:
                if self._lru.touch(key):
                    continue
                if not self._lru.fits(nbytes):
                    evicted.append((key, blob))
                    continue
            # Copy outside the lock: pinning or materializing a view can take a while.
            stored = _to_pinned(blob) if self.is_pinned else _owned_bytes(blob)
            with self._lock:
                if self._lru.touch(key):  # another thread stored it meanwhile
                    continue
                for victim in self._lru.victims_for(nbytes):
                    self._lru.remove(victim)
                    evicted.append((victim, self._pages.pop(victim)))
                    self._stats.evictions += 1
                self._lru.add(key, nbytes)
                self._pages[key] = stored
        return evicted  # type: ignore[return-value]  # pinned pages are memoryviews

    def delete_many(self, keys: Sequence[bytes]) -> int:
        num_deleted = 0
        with self._lock:
            for key in keys:
                if self._lru.remove(key) is not None:
                    del self._pages[key]
                    num_deleted += 1
        return num_deleted

    def keys_lru_order(self) -> list[bytes]:
        """Keys from least to most recently used (for tests and debugging)."""
        with self._lock:
            return self._lru.keys_oldest_first()

    def stats(self) -> TierStats:
        with self._lock:
            s = self._stats
            return TierStats(self.name, self._lru.used_bytes, s.capacity_bytes, len(self._lru),
                             s.hits, s.misses, s.evictions, s.errors, True)

    def close(self) -> None:
        with self._lock:
            self._pages.clear()
            self._lru = LruIndex(self._lru.capacity_bytes)


def _owned_bytes(blob: bytes | memoryview) -> bytes:
    """The page as an immutable object the tier may keep: bytes as-is, anything else copied."""
    return blob if isinstance(blob, bytes) else bytes(blob)
