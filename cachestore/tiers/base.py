"""The interface every storage tier implements.

A tier stores encoded pages (cachestore.codec) by 16-byte key. It does not decode or verify them:
TieredStore does, and tells the tier to drop a page that fails verification.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from kvmesh.cachestore.errors import TierFull, TierUnavailable

__all__ = ["Page", "Tier", "TierFull", "TierStats", "TierUnavailable"]

Page = tuple[bytes, bytes | memoryview]  # (key, encoded page)


@dataclass
class TierStats:
    name: str
    used_bytes: int = 0
    capacity_bytes: int = 0
    num_pages: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    errors: int = 0
    is_available: bool = True
    # pages whose MAC failed (forged, altered, or sealed with another key): dropped as misses,
    # also counted in `errors` (the wire's Stats carries errors only)
    num_forged: int = 0


class Tier(ABC):
    """A key -> encoded page store with a byte capacity. Implementations are thread-safe.

    Contract:
    - `get_many` returns the stored bytes or None per key; it never raises for a missing key.
    - `put_many` stores pages atomically (a page is visible only once whole) and returns the
      pages it evicted to make room (LRU over unpinned pages), so the caller can demote them.
      Re-putting a present key is a cheap no-op that refreshes its recency.
    - Backend failures raise TierUnavailable.
    """

    name: str  # "cpu", "disk", "redis", "remote"

    @abstractmethod
    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Metadata-only presence check; does not touch recency."""

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        """Encoded pages for `keys` (None where absent); refreshes recency of hits."""

    @abstractmethod
    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        """Store (key, encoded page) pairs; returns evicted (key, encoded page) pairs."""

    @abstractmethod
    def delete_many(self, keys: Sequence[bytes]) -> int:
        """Remove keys; returns how many were present."""

    @abstractmethod
    def stats(self) -> TierStats: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections / files."""
