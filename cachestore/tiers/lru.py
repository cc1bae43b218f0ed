"""Byte-capacity LRU bookkeeping shared by the local tiers (cpu, disk). Not thread-safe: the
owning tier holds its lock around every call."""

from __future__ import annotations

from collections import OrderedDict


class LruIndex:
    """key -> nbytes in recency order (oldest first), with the sum of nbytes kept."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: bytes) -> bool:
        return key in self._sizes

    def keys_oldest_first(self) -> list[bytes]:
        return list(self._sizes)

    def touch(self, key: bytes) -> bool:
        """Mark `key` most recently used; False if absent."""
        if key not in self._sizes:
            return False
        self._sizes.move_to_end(key)
        return True

    def fits(self, nbytes: int) -> bool:
        """Whether a page of `nbytes` can ever be held (evicting everything else if needed)."""
        return nbytes <= self.capacity_bytes

    def victims_for(self, nbytes: int) -> list[bytes]:
        """Oldest keys to remove so that `nbytes` more fit; does not remove them."""
        excess = self.used_bytes + nbytes - self.capacity_bytes
        victims: list[bytes] = []
        for key, size in self._sizes.items():
            if excess <= 0:
                break
            victims.append(key)
            excess -= size
        return victims

    def add(self, key: bytes, nbytes: int) -> None:
        """Insert as most recent. The caller has made room (victims_for + remove)."""
        assert key not in self._sizes
        self._sizes[key] = nbytes
        self.used_bytes += nbytes

    def remove(self, key: bytes) -> int | None:
        """Forget `key`; returns its nbytes, or None if absent."""
        nbytes = self._sizes.pop(key, None)
        if nbytes is not None:
            self.used_bytes -= nbytes
        return nbytes
