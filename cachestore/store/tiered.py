"""TieredStore: chains tiers (fastest first) into one page store.

- put: encodes full pages (cachestore.codec) and stores the ones no tier holds in the top
  available tier; evictions cascade down (tier i -> tier i+1 -> ...; the last tier drops them).
- get_closest: longest contiguous verified prefix. Presence is checked top-down with one batched
  `contains_many` per tier, then each tier serves its pages with one `get_many`; every page is
  verified (key, namespace, shape, token ids, checksum). A bad page is deleted from its tier,
  counted as an error and ends the prefix. Hits from lower tiers are promoted to the top tier.
- Pages of one call reach the tiers in prompt order, so when a prompt overflows the top tier
  its first pages are demoted first: the start of a prefix lands in the (larger, possibly
  persistent) lower tiers and the top tier keeps the most recently written pages.
- A tier raising TierUnavailable is a miss for that call, counted in its errors and reported
  `is_available=False` until it answers again; no tier exception reaches the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvmesh.cachestore.codec import decode_pages, encode_page
from kvmesh.cachestore.errors import InvalidConfig, InvalidRequest, StoreClosed
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc.request import PageRequest
from kvmesh.cachestore.store.inflight import InFlightPages
from kvmesh.cachestore.tiers.base import Tier, TierFull, TierStats, TierUnavailable

Page = tuple[bytes, bytes | memoryview]  # (key, encoded page)
_Found = tuple[int, bytes | memoryview, bool]  # (tier index, encoded page, is_in_flight)


@dataclass(frozen=True)
class ClosestPages:
    num_tokens: int  # matched tokens, a multiple of page_size, > 0
    payloads: list[memoryview]  # per page: ns.page_nbytes, verified, [L, 2, P, H, D]
    tiers: list[str]  # tier name each page came from


@dataclass(frozen=True)
class LookupResult:
    num_tokens: int
    tiers: list[str]


@dataclass(frozen=True)
class FlushResult:
    num_flushed: int  # top-tier pages copied down now
    num_already_below: int  # top-tier pages some lower tier held already
    num_left: int  # top-tier pages not copied: time ran out, or no tier below took them
    seconds: float


FLUSH_BATCH_PAGES = 64


class TieredStore:
    """Thread-safe: tiers lock themselves; the store keeps per-tier error counters and the
    in-flight registry (pages between two tiers during a demotion) under its own locks.
    A page deleted while it is being demoted may reappear in the tier below."""

    def __init__(self, tiers: list[Tier]) -> None:
        if not tiers:
            raise InvalidConfig("TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self._lock = threading.Lock()
        self._errors = [0] * len(self.tiers)
        self._is_available = [True] * len(self.tiers)
        self._is_closed = False
        self._in_flight = InFlightPages()

    # -- public API ---------------------------------------------------------------------------

    def put(self, ns: Namespace, token_ids, payloads: Sequence[bytes | memoryview]) -> int:
        """Store every full page of `token_ids` (payload i = page i, ns.page_nbytes each).
        Returns the pages newly stored; pages some tier already holds are skipped."""
        req = self._request(ns, token_ids)
        if len(payloads) != len(req.keys):
            raise InvalidRequest(f"{len(req.keys)} full pages of {ns.page_size} tokens need "
                                 f"{len(req.keys)} payloads, got {len(payloads)}")
        for i, payload in enumerate(payloads):
            nbytes = memoryview(payload).nbytes
            if nbytes != ns.page_nbytes:
                raise InvalidRequest(f"payload {i} is {nbytes} bytes, a page of {ns.page_shape} "
                                     f"{ns.dtype_name} is {ns.page_nbytes}")
        owner = self._locate(req.keys)
        pages = [(req.keys[i], encode_page(ns, req.keys[i], req.page_tokens(i), payloads[i]))
                 for i in range(len(req.keys)) if owner[i] is None]
        if not pages:
            return 0
        dropped = {key for key, _ in self._put_from(0, pages)}
        return sum(1 for key, _ in pages if key not in dropped)

    def get_closest(self, ns: Namespace, token_ids) -> ClosestPages | None:
        """Longest contiguous prefix of verified pages, or None when page 0 is not stored.
        Verified pages from lower tiers are promoted to the top tier (they stay below too)."""
        req = self._request(ns, token_ids)
        found, is_raced = self._fetch(req.keys, 0)
        if is_raced:  # a page moved down between contains and get: look for the rest once more
            found += self._fetch(req.keys, len(found))[0]
        payloads: list[memoryview] = []
        tier_names: list[str] = []
        promote: list[Page] = []
        # verified on a thread pool when large (an 8K-token 8B prefix is 1 GB)
        decoded = decode_pages([blob for _, blob, _ in found], ns, req.keys[: len(found)],
                               [req.page_tokens(i) for i in range(len(found))])
        for i, ((t, blob, is_in_flight), payload) in enumerate(zip(found, decoded, strict=True)):
            if payload is None:
                self._drop_corrupt(t, req.keys[i])
                break
            payloads.append(payload)
            tier_names.append(self.tiers[t].name)
            if t > 0 or is_in_flight:
                promote.append((req.keys[i], blob))
        if promote:
            self._put_from(0, promote)
        if not payloads:
            return None
        return ClosestPages(len(payloads) * ns.page_size, payloads, tier_names)

    def lookup(self, ns: Namespace, token_ids) -> LookupResult:
        """Matched tokens and the tier of each page; metadata only (pages are not verified)."""
        req = self._request(ns, token_ids)
        owner = self._locate(req.keys)
        num_found = _prefix_len(owner)
        names = [self.tiers[t].name for t in owner[:num_found] if t is not None]
        return LookupResult(num_found * ns.page_size, names)

    def delete(self, ns: Namespace, token_ids, page_indices: Sequence[int] | None = None) -> int:
        """Remove the given pages (default: every full page) from every tier. Returns how many
        of them some tier held."""
        req = self._request(ns, token_ids)
        if page_indices is None:
            indices = list(range(len(req.keys)))
        else:
            indices = sorted(set(page_indices))
            bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < len(req.keys)]
            if bad:
                raise InvalidRequest(f"page indices {bad} out of range: the tokens have "
                                     f"{len(req.keys)} full pages")
        keys = [req.keys[i] for i in indices]
        was_present = [False] * len(keys)
        for t in range(len(self.tiers)):
            found = self._call(t, "contains_many", keys)
            if found is None:
                continue
            was_present = [a or b for a, b in zip(was_present, found, strict=True)]
            if any(found):
                self._call(t, "delete_many", [k for k, f in zip(keys, found, strict=True) if f])
        return sum(was_present)

    def stats(self) -> list[TierStats]:
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

    def flush_down(self, timeout_s: float) -> FlushResult:
        """Copy every page of the top tier that no lower tier holds into the tiers below (its
        evictions cascading as usual), least recently used first, so a lower tier's LRU order
        (the disk tier's is file mtimes, kept across restarts) follows the top tier's. For a
        graceful stop: a memory tier's pages outlive the process. Leaves the top tier as it
        is. Stops after `timeout_s` at the end of a batch: pages not copied by then are
        `num_left`, only in the top tier (lost with it when it is memory)."""
        start = time.monotonic()
        keys_lru_order = getattr(self.tiers[0], "keys_lru_order", None)
        if len(self.tiers) < 2 or keys_lru_order is None:
            return FlushResult(0, 0, 0, 0.0)
        keys: list[bytes] = keys_lru_order()
        num_flushed = num_below = 0
        for first in range(0, len(keys), FLUSH_BATCH_PAGES):
            if time.monotonic() - start >= timeout_s:
                break
            batch = keys[first : first + FLUSH_BATCH_PAGES]
            for t in range(1, len(self.tiers)):
                found = self._call(t, "contains_many", batch) or [False] * len(batch)
                num_below += sum(found)
                batch = [key for key, is_found in zip(batch, found, strict=True) if not is_found]
            blobs = self._call(0, "get_many", batch) or [None] * len(batch)
            pages = [(key, blob) for key, blob in zip(batch, blobs, strict=True)
                     if blob is not None]
            dropped = {key for key, _ in self._put_from(1, pages)}
            num_flushed += sum(1 for key, _ in pages if key not in dropped)
        return FlushResult(num_flushed, num_below, len(keys) - num_flushed - num_below,
                           time.monotonic() - start)

    def close(self) -> None:
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
        for tier in self.tiers:
            tier.close()

    # -- internals ----------------------------------------------------------------------------

    def _request(self, ns: Namespace, token_ids) -> PageRequest:
        if self._is_closed:
            raise StoreClosed("the store is closed")
        if not isinstance(ns, Namespace):
            raise InvalidRequest(f"namespace must be a Namespace, got {type(ns).__name__}")
        return PageRequest.of(ns, token_ids)

    def _locate(self, keys: list[bytes]) -> list[int | None]:
        """Index of the first tier holding each key (None: nowhere): one batched
        contains_many per tier, top-down, asking each tier only for keys not found above."""
        owner: list[int | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for t in range(len(self.tiers)):
            if not pending:
                break
            found = self._call(t, "contains_many", [keys[i] for i in pending])
            if found is None:
                continue
            for i, is_found in zip(pending, found, strict=True):
                if is_found:
                    owner[i] = t
            pending = [i for i in pending if owner[i] is None]
        for i in pending:
            owner[i] = self._in_flight.tier_of(keys[i])
        return owner

    def _fetch(self, keys: list[bytes], start: int) -> tuple[list[_Found], bool]:
        """Pages start, start+1, ... up to the first one found nowhere: (tier, blob, whether it
        came from the in-flight registry) each, one get_many per tier. The bool says the run
        ended at a page a tier had at contains time but not at get time (moved or evicted)."""
        owner = self._locate(keys[start:])
        num_found = _prefix_len(owner)
        blobs: list[bytes | memoryview | None] = [None] * num_found
        for t in range(len(self.tiers)):
            indices = [i for i in range(num_found) if owner[i] == t]
            if not indices:
                continue
            got = self._call(t, "get_many", [keys[start + i] for i in indices])
            for i, blob in zip(indices, got or [None] * len(indices), strict=True):
                blobs[i] = blob
        found: list[_Found] = []
        for i, blob in enumerate(blobs):
            tier_index = owner[i]
            assert tier_index is not None
            if blob is not None:
                found.append((tier_index, blob, False))
                continue
            entry = self._in_flight.get(keys[start + i])
            if entry is None:
                return found, self._is_available[tier_index]
            found.append((entry[0], entry[1], True))
        return found, False

    def _put_from(self, start: int, pages: Sequence[Page]) -> Sequence[Page]:
        """Put `pages` into the first available tier at or below `start`, cascading each tier's
        evictions into the tiers below it. Returns the pages no tier kept (evicted from the
        last tier, or not stored because every tier below was down).

        Evicted pages are in the in-flight registry until the next tier has them, so a reader
        looking for them meanwhile still finds them (`_locate`, `_fetch`)."""
        in_flight: Sequence[Page] = []
        try:
            for t in range(start, len(self.tiers)):
                if not pages:
                    break
                evicted = self._call(t, "put_many", pages)
                if evicted is None:  # tier down or full: the next one gets the same pages
                    continue
                self._in_flight.add(t, evicted)
                self._in_flight.remove(in_flight)
                in_flight = pages = evicted
            return pages
        finally:
            self._in_flight.remove(in_flight)

    def _drop_corrupt(self, t: int, key: bytes) -> None:
        with self._lock:
            self._errors[t] += 1
        self._call(t, "delete_many", [key])

    def _call(self, t: int, method: str, arg):
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


def _prefix_len(owner: list[int | None]) -> int:
    for i, t in enumerate(owner):
        if t is None:
            return i
    return len(owner)
