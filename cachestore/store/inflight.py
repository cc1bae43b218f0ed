"""Pages between two tiers: evicted from tier t, not yet stored by the tier below.

TieredStore registers a tier's evictions here before handing them to the next tier and removes
them once that tier's put returns, so a reader that checks the tiers meanwhile still finds the
page instead of a miss. The blobs are immutable, so sharing them with readers is safe.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence


class InFlightPages:
    """Thread-safe key -> (source tier index, encoded page), counted so that the same page
    demoted by two threads at once stays visible until both are done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pages: dict[bytes, tuple[int, bytes | memoryview, int]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._pages)

    def add(self, tier_index: int, pages: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        with self._lock:
            for key, blob in pages:
                count = self._pages[key][2] if key in self._pages else 0
                self._pages[key] = (tier_index, blob, count + 1)

    def remove(self, pages: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        """Undo one `add` of each page."""
        with self._lock:
            for key, _ in pages:
                tier_index, blob, count = self._pages[key]
                if count == 1:
                    del self._pages[key]
                else:
                    self._pages[key] = (tier_index, blob, count - 1)

    def tier_of(self, key: bytes) -> int | None:
        with self._lock:
            entry = self._pages.get(key)
        return None if entry is None else entry[0]

    def get(self, key: bytes) -> tuple[int, bytes | memoryview] | None:
        with self._lock:
            entry = self._pages.get(key)
        return None if entry is None else (entry[0], entry[1])
