"""TierChain: the tiers of one store, fastest first, and the three moves every store call is
made of: locate a key, put pages (evictions cascading down), delete keys.

Both faces of the store go through it: TieredStore (namespace calls: Put, GetClosest, Lookup,
Delete) and PageAccess (key-level calls: HasPages, GetPages, PutPages, DeletePages). So both see
pages that are between two tiers (the in-flight registry) and both count a tier's failures.

A tier raising TierUnavailable is a miss for that call, counted in its errors and reported
`is_available=False` until it answers again; no tier exception leaves this module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from kvmesh.cachestore.errors import InvalidConfig, TierFull, TierUnavailable
from kvmesh.cachestore.store.inflight import InFlightPages
from kvmesh.cachestore.tiers.base import Page, Tier, TierStats

Blob = bytes | memoryview  # an encoded page (cachestore.codec)
Found = tuple[int, Blob, bool]  # (tier index, encoded page, is_in_flight)
T = TypeVar("T")

# Pages put at a time: a put holds its batch's new copies and the pages they evict (whose slots
# come back only once nothing holds them), not the whole call's.
PUT_BATCH_NBYTES = 16 << 20


def batches(items: Sequence[T], sizes: Sequence[int],
            batch_nbytes: int = PUT_BATCH_NBYTES) -> Iterator[Sequence[T]]:
    """`items` in consecutive runs whose `sizes` add up to about `batch_nbytes` (one item at
    least)."""
    start = total = 0
    for i, nbytes in enumerate(sizes):
        if total and total + nbytes > batch_nbytes:
            yield items[start:i]
            start, total = i, 0
        total += nbytes
    if start < len(items):
        yield items[start:]


class TierChain:
    """Thread-safe: tiers lock themselves; the per-tier error counters and the in-flight
    registry (pages between two tiers during a demotion) have their own locks. A page deleted
    while it is being demoted may reappear in the tier below."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        if not tiers:
            raise InvalidConfig("TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self._lock = threading.Lock()
        self._errors = [0] * len(self.tiers)
        self._is_available = [True] * len(self.tiers)
        self._in_flight = InFlightPages()

    def locate(self, keys: Sequence[bytes]) -> list[int | None]:
        """Index of the first tier holding each key (None: nowhere; a page in flight counts as
        held by the tier it left): one batched contains_many per tier, top-down, asking each
        tier only for keys not found above."""
        owner: list[int | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for t in range(len(self.tiers)):
            if not pending:
                break
            found = self.call(t, "contains_many", [keys[i] for i in pending])
            if found is None:
                continue
            for i, is_found in zip(pending, found, strict=True):
                if is_found:
                    owner[i] = t
            pending = [i for i in pending if owner[i] is None]
        for i in pending:
            owner[i] = self._in_flight.tier_of(keys[i])
        return owner

    def fetch(self, keys: Sequence[bytes], owner: Sequence[int | None]) -> list[Found | None]:
        """The pages of `keys` from the tiers `owner` (locate's answer) names, one get_many per
        tier; (tier, blob, whether it came from the in-flight registry) each, None where the
        owner is None or the page left its tier between locate and now (moved or evicted)."""
        blobs: list[Blob | None] = [None] * len(keys)
        for t in range(len(self.tiers)):
            indices = [i for i, o in enumerate(owner) if o == t]
            if not indices:
                continue
            got = self.call(t, "get_many", [keys[i] for i in indices])
            for i, blob in zip(indices, got or [None] * len(indices), strict=True):
                blobs[i] = blob
        found: list[Found | None] = [None] * len(keys)
        for i, (tier_index, blob) in enumerate(zip(owner, blobs, strict=True)):
            if tier_index is None:
                continue
            if blob is not None:
                found[i] = (tier_index, blob, False)
                continue
            entry = self._in_flight.get(keys[i])
            if entry is not None:
                found[i] = (entry[0], entry[1], True)
        return found

    def put(self, start: int, pages: Sequence[Page]) -> list[bytes]:
        """Put `pages` into the first available tier at or below `start`, cascading each tier's
        evictions into the tiers below it. Returns the keys of the pages no tier kept (evicted
        from the last tier, or not stored because every tier below was down or full); their
        blobs are let go. Callers batch large puts (`batches`).

        Evicted pages are in the in-flight registry until the next tier has them, so a reader
        looking for them meanwhile still finds them (`locate`, `fetch`)."""
        in_flight: Sequence[Page] = []
        try:
            for t in range(start, len(self.tiers)):
                if not pages:
                    break
                evicted = self.call(t, "put_many", pages)
                if evicted is None:  # tier down or full: the next one gets the same pages
                    continue
                self._in_flight.add(t, evicted)
                self._in_flight.remove(in_flight)
                in_flight = pages = evicted
            return [key for key, _ in pages]
        finally:
            self._in_flight.remove(in_flight)

    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        """Remove `keys` from every tier; per key, whether some tier held it."""
        was_present = [False] * len(keys)
        for t in range(len(self.tiers)):
            found = self.call(t, "contains_many", keys)
            if found is None:
                continue
            was_present = [a or b for a, b in zip(was_present, found, strict=True)]
            if any(found):
                self.call(t, "delete_many", [k for k, f in zip(keys, found, strict=True) if f])
        return was_present

    def drop_corrupt(self, t: int, keys: Sequence[bytes]) -> None:
        """Delete pages of tier `t` that failed verification, counting each as an error of it."""
        with self._lock:
            self._errors[t] += len(keys)
        self.call(t, "delete_many", list(keys))

    def stats(self) -> list[TierStats]:
        """Each tier's stats, with this chain's error counts and availability folded in."""
        out = []
        for t, tier in enumerate(self.tiers):
            try:
                s = tier.stats()
            except TierUnavailable:
                self._mark(t, is_available=False)
                s = TierStats(name=tier.name, is_available=False)
            with self._lock:
                out.append(replace(s, errors=s.errors + self._errors[t],
                                   is_available=s.is_available and self._is_available[t]))
        return out

    def is_available(self, t: int) -> bool:
        with self._lock:
            return self._is_available[t]

    def call(self, t: int, method: str, arg: Any) -> Any:
        """tier.method(arg); None when the tier is down (counted) or full."""
        try:
            result = getattr(self.tiers[t], method)(arg)
        except TierUnavailable:
            self._mark(t, is_available=False)
            return None
        except TierFull:
            return None
        self._mark(t, is_available=True)
        return result

    def _mark(self, t: int, is_available: bool) -> None:
        with self._lock:
            if not is_available:
                self._errors[t] += 1
            self._is_available[t] = is_available
