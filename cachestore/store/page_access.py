"""Key-level access to a TieredStore's tiers: what the page RPCs (HasPages, GetPages, PutPages,
DeletePages) serve, so that a RemoteTier on another machine can use this store as its backend.

Pages here are encoded pages (cachestore.codec) addressed by key. The caller's TieredStore
verifies them fully (namespace, token ids) when it reads them; this side checks what it can
without a namespace: the header parses, its key is the one asked for, and the checksum holds. A
page failing that is never stored, and a stored one failing it is dropped and reads as a miss.

Locating, putting and deleting are the store's own (TierChain, chain.py): a page between two
tiers is found here too, and a tier's failures are counted in its stats.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.cachestore.bulk_pool import map_chunked
from kvmesh.cachestore.codec import checksum, decode_header
from kvmesh.cachestore.errors import InvalidRequest, PageCorrupt
from kvmesh.cachestore.keys import KEY_NBYTES
from kvmesh.cachestore.store.chain import Page, batches
from kvmesh.cachestore.store.tiered import TieredStore


def check_page(key: bytes, blob: bytes | memoryview) -> None:
    """Raise PageCorrupt unless `blob` is a whole, intact encoded page stored under `key`."""
    header = decode_header(blob)
    if header.key != key:
        raise PageCorrupt("page header key differs from its key")
    payload = memoryview(blob).cast("B")[header.nbytes :]
    if checksum(payload) != header.checksum:
        raise PageCorrupt("page checksum mismatch")


def is_intact(key: bytes, blob: bytes | memoryview) -> bool:
    """check_page as a flag."""
    try:
        check_page(key, blob)
    except PageCorrupt:
        return False
    return True


def check_pages(pages: Sequence[Page]) -> list[str | None]:
    """check_page of every (key, blob): per page None, or what is wrong with it. A large batch
    is checked on the bulk thread pool (the checksum releases the GIL)."""

    def check(part: range) -> list[str | None]:
        problems: list[str | None] = []
        for i in part:
            try:
                check_page(*pages[i])
                problems.append(None)
            except PageCorrupt as exc:
                problems.append(str(exc))
        return problems

    return map_chunked(check, len(pages), sum(memoryview(blob).nbytes for _, blob in pages))


def check_keys(keys: Sequence[bytes]) -> None:
    bad = [i for i, key in enumerate(keys) if len(key) != KEY_NBYTES]
    if bad:
        raise InvalidRequest(f"page keys must be {KEY_NBYTES} bytes; keys {bad[:8]} are not")


class PageAccess:
    """The key-level face of a TieredStore: the same TierChain (so the same in-flight registry
    and error counters) as its namespace calls. Thread-safe. A tier that is down reads as a
    miss. Unlike GetClosest, a get does not promote hits from lower tiers."""

    def __init__(self, store: TieredStore) -> None:
        self._chain = store.chain

    def has(self, keys: Sequence[bytes]) -> list[bool]:
        check_keys(keys)
        return [owner is not None for owner in self._chain.locate(keys)]

    def get(
        self, keys: Sequence[bytes], prefix_only: bool = False, verify: bool = True
    ) -> list[bytes | memoryview | None]:
        """Encoded pages (None where absent or corrupt); hits refresh recency in their tier.
        `prefix_only`: keys after the first absent one are not read (None). `verify=False`
        leaves the checks to the caller, which must run `verify` (or check_page each page and
        `delete` the bad ones) before handing any page out."""
        check_keys(keys)
        owner = self._chain.locate(keys)
        if prefix_only and None in owner:
            first = owner.index(None)
            owner[first:] = [None] * (len(owner) - first)
        out = [None if page is None else page[1] for page in self._chain.fetch(keys, owner)]
        return self.verify(keys, out) if verify else out

    def verify(
        self, keys: Sequence[bytes], blobs: Sequence[bytes | memoryview | None]
    ) -> list[bytes | memoryview | None]:
        """The blobs with every page failing check_page replaced by None and deleted from the
        tiers (counted as an error of the first tier holding it); large batches are checked on
        the bulk thread pool."""
        found = [(i, blob) for i, blob in enumerate(blobs) if blob is not None]

        def check(part: range) -> list[bool]:
            return [is_intact(keys[found[j][0]], found[j][1]) for j in part]

        nbytes = sum(len(blob) for _, blob in found)
        good = map_chunked(check, len(found), nbytes)
        out = list(blobs)
        bad = [found[j][0] for j, ok in enumerate(good) if not ok]
        for i in bad:
            out[i] = None
        if bad:
            self._drop([keys[i] for i in bad])
        return out

    def put(self, pages: Sequence[Page], copy: bool = True) -> int:
        """Store pages no tier holds into the top tier, cascading evictions down. Every page is
        checked first (check_pages, on the bulk pool); one bad page rejects the whole call
        (InvalidRequest naming the first), storing nothing.
        `copy=False`: the blobs are the caller's to give away (e.g. slots reserved in the cpu
        tier, which then keeps them in place)."""
        check_keys([key for key, _ in pages])
        problems = check_pages(pages)
        bad = next((i for i, problem in enumerate(problems) if problem is not None), None)
        if bad is not None:
            raise InvalidRequest(f"page {bad}: {problems[bad]}")
        owner = self._chain.locate([key for key, _ in pages])
        new = [page for page, o in zip(pages, owner, strict=True) if o is None]
        num_stored = 0
        for part in batches(new, [memoryview(blob).nbytes for _, blob in new]):
            # copied: the blobs are views of received frames, the tiers keep what they are given
            copies: list[Page] = [(key, bytes(blob) if copy else blob) for key, blob in part]
            dropped = set(self._chain.put(0, copies))
            num_stored += sum(1 for key, _ in copies if key not in dropped)
        return num_stored

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys from every tier; returns how many some tier held."""
        return sum(self._chain.delete(keys))

    def _drop(self, keys: Sequence[bytes]) -> None:
        """Delete corrupt pages from every tier, counting each against the tier that held it."""
        owner = self._chain.locate(keys)
        for t in sorted({o for o in owner if o is not None}):
            self._chain.drop_corrupt(t, [key for key, o in zip(keys, owner, strict=True) if o == t])
        self._chain.delete(keys)
