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
- Locating, putting (with the in-flight registry) and deleting are TierChain's (chain.py), which
  the key-level page calls (page_access.py) share. A tier raising TierUnavailable is a miss for
  that call, counted in its errors; no tier exception reaches the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.codec_batch import decode_pages
from kvmesh.cachestore.errors import InvalidRequest, StoreClosed
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.store.chain import Found, Page, TierChain, batches
from kvmesh.cachestore.store.request import PageRequest
from kvmesh.cachestore.tiers.base import Tier, TierStats


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
    """Thread-safe: tiers lock themselves, and TierChain keeps its counters and in-flight
    registry under its own locks. A page deleted while it is being demoted may reappear in the
    tier below."""

    def __init__(self, tiers: list[Tier]) -> None:
        self.chain = TierChain(tiers)
        self.tiers = self.chain.tiers
        self._lock = threading.Lock()
        self._is_closed = False

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
        owner = self.chain.locate(req.keys)
        new = [i for i in range(len(req.keys)) if owner[i] is None]
        num_stored = 0
        for part in batches(new, [ns.page_nbytes] * len(new)):  # encoded copies: a batch's
            pages = [(req.keys[i], encode_page(ns, req.keys[i], req.page_tokens(i), payloads[i]))
                     for i in part]
            dropped = set(self.chain.put(0, pages))
            num_stored += sum(1 for key, _ in pages if key not in dropped)
        return num_stored

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
                self.chain.drop_corrupt(t, [req.keys[i]])
                break
            payloads.append(payload)
            tier_names.append(self.tiers[t].name)
            if t > 0 or is_in_flight:
                promote.append((req.keys[i], blob))
        if promote:
            self.chain.put(0, promote)
        if not payloads:
            return None
        return ClosestPages(len(payloads) * ns.page_size, payloads, tier_names)

    def lookup(self, ns: Namespace, token_ids) -> LookupResult:
        """Matched tokens and the tier of each page; metadata only (pages are not verified)."""
        req = self._request(ns, token_ids)
        owner = self.chain.locate(req.keys)
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
        return sum(self.chain.delete([req.keys[i] for i in indices]))

    def stats(self) -> list[TierStats]:
        return self.chain.stats()

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
                found = self.chain.call(t, "contains_many", batch) or [False] * len(batch)
                num_below += sum(found)
                batch = [key for key, is_found in zip(batch, found, strict=True) if not is_found]
            blobs = self.chain.call(0, "get_many", batch) or [None] * len(batch)
            pages = [(key, blob) for key, blob in zip(batch, blobs, strict=True)
                     if blob is not None]
            dropped = set(self.chain.put(1, pages))
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

    def _fetch(self, keys: list[bytes], start: int) -> tuple[list[Found], bool]:
        """Pages start, start+1, ... up to the first one found nowhere. The bool says the run
        ended at a page a tier had at contains time but not at get time (moved or evicted)."""
        owner = self.chain.locate(keys[start:])
        num_found = _prefix_len(owner)
        fetched = self.chain.fetch(keys[start : start + num_found], owner[:num_found])
        found: list[Found] = []
        for tier_index, page in zip(owner[:num_found], fetched, strict=True):
            if page is None:
                assert tier_index is not None
                return found, self.chain.is_available(tier_index)
            found.append(page)
        return found, False


def _prefix_len(owner: list[int | None]) -> int:
    for i, t in enumerate(owner):
        if t is None:
            return i
    return len(owner)
