"""Key-level access to a TieredStore's tiers: what the page RPCs (HasPages, GetPages, PutPages,
DeletePages) serve, so that a RemoteTier on another machine can use this store as its backend.

Pages here are encoded pages (cachestore.codec) addressed by key. The caller's TieredStore
verifies them fully (namespace, token ids) when it reads them; this side checks what it can
without a namespace: the header parses, its key is the one asked for, and the checksum holds. A
page failing that is never stored, and a stored one failing it is dropped and reads as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.cachestore.codec import PageCorrupt, checksum, decode_header, map_chunked
from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.keys import KEY_NBYTES
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.base import TierFull, TierUnavailable

Page = tuple[bytes, bytes | memoryview]


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


def check_keys(keys: Sequence[bytes]) -> None:
    bad = [i for i, key in enumerate(keys) if len(key) != KEY_NBYTES]
    if bad:
        raise InvalidRequest(f"page keys must be {KEY_NBYTES} bytes; keys {bad[:8]} are not")


class PageAccess:
    """Thread-safe (tiers lock themselves). A tier that is down reads as a miss."""

    def __init__(self, store: TieredStore) -> None:
        self._tiers = store.tiers

    def has(self, keys: Sequence[bytes]) -> list[bool]:
        return [owner is not None for owner in self._locate(keys)]

    def get(
        self, keys: Sequence[bytes], prefix_only: bool = False, verify: bool = True
    ) -> list[bytes | memoryview | None]:
        """Encoded pages (None where absent or corrupt); hits refresh recency in their tier.
        `prefix_only`: keys after the first absent one are not read (None). `verify=False`
        leaves the checks to the caller, which must run `verify` (or check_page each page and
        `delete` the bad ones) before handing any page out."""
        owner = self._locate(keys)
        if prefix_only and None in owner:
            first = owner.index(None)
            owner[first:] = [None] * (len(owner) - first)
        out: list[bytes | memoryview | None] = [None] * len(keys)
        for t, tier in enumerate(self._tiers):
            indices = [i for i, o in enumerate(owner) if o == t]
            if not indices:
                continue
            try:
                blobs = tier.get_many([keys[i] for i in indices])
            except TierUnavailable:
                continue
            for i, blob in zip(indices, blobs, strict=True):
                out[i] = blob
        return self.verify(keys, out) if verify else out

    def verify(
        self, keys: Sequence[bytes], blobs: Sequence[bytes | memoryview | None]
    ) -> list[bytes | memoryview | None]:
        """The blobs with every page failing check_page replaced by None and deleted from the
        tiers; large batches are checked on the bulk thread pool."""
        found = [i for i, blob in enumerate(blobs) if blob is not None]

        def check(part: range) -> list[bool]:
            return [is_intact(keys[found[j]], blobs[found[j]]) for j in part]

        nbytes = sum(len(blobs[i]) for i in found)
        good = map_chunked(check, len(found), nbytes)
        out = list(blobs)
        bad = [found[j] for j, ok in enumerate(good) if not ok]
        for i in bad:
            out[i] = None
        if bad:
            self.delete([keys[i] for i in bad])
        return out

    def put(self, pages: Sequence[Page]) -> int:
        """Store pages no tier holds into the top tier, cascading evictions down. Every page is
        checked first; one bad page rejects the whole call (InvalidRequest), storing nothing."""
        check_keys([key for key, _ in pages])
        for i, (key, blob) in enumerate(pages):
            try:
                check_page(key, blob)
            except PageCorrupt as exc:
                raise InvalidRequest(f"page {i}: {exc}") from None
        owner = self._locate([key for key, _ in pages])
        new = [(key, bytes(blob)) for (key, blob), o in zip(pages, owner, strict=True) if o is None]
        pending = new
        for tier in self._tiers:
            if not pending:
                break
            try:
                pending = tier.put_many(pending)
            except (TierUnavailable, TierFull):
                continue
        dropped = {key for key, _ in pending}
        return sum(1 for key, _ in new if key not in dropped)

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys from every tier; returns how many some tier held."""
        was_present = [False] * len(keys)
        for t in range(len(self._tiers)):
            found = self._contains_in(t, keys)
            if found is None:
                continue
            was_present = [a or b for a, b in zip(was_present, found, strict=True)]
            self._delete_in(t, [k for k, f in zip(keys, found, strict=True) if f])
        return sum(was_present)

    def _locate(self, keys: Sequence[bytes]) -> list[int | None]:
        check_keys(keys)
        owner: list[int | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for t in range(len(self._tiers)):
            if not pending:
                break
            found = self._contains_in(t, [keys[i] for i in pending])
            if found is None:
                continue
            for i, is_found in zip(pending, found, strict=True):
                if is_found:
                    owner[i] = t
            pending = [i for i in pending if owner[i] is None]
        return owner

    def _contains_in(self, t: int, keys: Sequence[bytes]) -> list[bool] | None:
        try:
            return self._tiers[t].contains_many(keys)
        except TierUnavailable:
            return None

    def _delete_in(self, t: int, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        try:
            self._tiers[t].delete_many(keys)
        except TierUnavailable:
            pass
