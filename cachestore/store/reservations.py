"""Slot reservations of the cpu tier: free slots a client fills itself (by a NIXL WRITE, or by a
copy into the server's shared arena files), made visible only by a commit once the store has
checked every page in them.

A reservation holds free slots of the tier (CpuTier.reserve_slots) for `ttl_s`. `commit` checks
each slot's bytes as an encoded page under its key (header + xxh3, PageAccess.put: a large
commit on the bulk pool's threads, the GIL released while hashing) and only when all pass puts
them into the tier, in place; one bad page stores none, and a failed or surplus slot goes back.
An expired reservation cannot be committed, and its slots stay out of use for one more TTL so
that a late write from a slow client lands in no page; so do an aborted one's (a commit of no
keys: the client's write failed, and a cut-off write may still land).

Used by the NIXL data plane (cachestore/dataplane/store_side.py, which says where the slots lie
in its registered arenas) and by same-host shared-memory puts (cachestore/shm/slot_puts.py,
which names the arena files), one table for both: CommitPages ends either kind.

Locks: `_lock` guards the table and the cooling slots, and nothing that takes another lock runs
under it (the tier's and the slots' locks are taken after it is released).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from kvmesh.cachestore.codec import header_nbytes
from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.store.page_access import PageAccess
from kvmesh.cachestore.tiers.cpu import CpuTier, ReservedSlot

MAX_RESERVATIONS = 256
MAX_SLOTS_PER_RESERVATION = 1 << 14
MIN_PAGE_NBYTES = header_nbytes(1) + 1  # the smallest encoded page: one token, one byte


class SlotReservations:
    """Thread-safe. `ids`: where reservation ids come from (shared with the lease tables, so
    one id names one thing)."""

    def __init__(self, tier: CpuTier, pages: PageAccess, ttl_s: float,
                 ids: Iterator[int] | None = None) -> None:
        if tier.slots is None:
            raise ValueError("slot reservations need a cpu tier with slot arenas")
        self.tier, self.pages, self.ttl_s = tier, pages, ttl_s
        self._ids = ids if ids is not None else itertools.count(1)
        self._lock = threading.Lock()  # table and cooling; never held into the tier
        self._table: OrderedDict[int, tuple[float, list[ReservedSlot]]] = OrderedDict()
        self._cooling: list[tuple[float, list[ReservedSlot]]] = []  # ended early or expired

    def take(self, num_slots: int, nbytes: int) -> list[ReservedSlot]:
        """Up to `num_slots` free slots of `nbytes` (fewer, maybe none, when the tier has no
        memory for more), not yet held: the caller keeps those it can use (`hold`) and gives
        the rest back (`give_back`). Raises InvalidRequest for a count or size no page has."""
        if not 0 < num_slots <= MAX_SLOTS_PER_RESERVATION or nbytes < MIN_PAGE_NBYTES:
            raise InvalidRequest(f"reserve 1..{MAX_SLOTS_PER_RESERVATION} slots of at least "
                                 f"{MIN_PAGE_NBYTES} bytes (an encoded page), not {num_slots} "
                                 f"of {nbytes} bytes")
        with self._lock:  # slots whose time is up go back first: they may be what is free
            expired = self._expire(time.monotonic())
        self._end(expired)
        return self.tier.reserve_slots(num_slots, nbytes)

    def give_back(self, slots: Sequence[ReservedSlot]) -> None:
        """Slots from `take` that no client ever saw: free again once dropped."""
        self.tier.unreserve(slots)

    def hold(self, slots: list[ReservedSlot]) -> int:
        """A reservation of `slots` (from `take`, not empty) for ttl_s: its id, or 0 when
        MAX_RESERVATIONS are outstanding (the slots then went back)."""
        now = time.monotonic()
        with self._lock:
            expired = self._expire(now)
            if len(self._table) >= MAX_RESERVATIONS:
                reservation_id = 0
            else:
                reservation_id = next(self._ids)
                self._table[reservation_id] = (now + self.ttl_s, slots)
        self._end(expired)
        if not reservation_id:
            self.tier.unreserve(slots)
        return reservation_id

    def commit(self, reservation_id: int, keys: Sequence[bytes]) -> int | None:
        """Check slot i as the encoded page of keys[i]; when every page passes, store them in
        place (PageAccess.put). Returns pages newly stored, None (nothing stored) for an
        unknown or expired reservation. Unused slots go back. Raises InvalidRequest naming
        the first bad page (nothing stored). No keys is an abort: the slots stay out of use
        for one TTL, as an expired reservation's."""
        now = time.monotonic()
        with self._lock:
            expired = self._expire(now)
            held = self._table.pop(reservation_id, None)
            if held is not None and not keys:
                self._cooling.append((now + self.ttl_s, held[1]))
        self._end(expired)
        if held is None:
            return None
        slots = held[1]
        if not keys:
            self.tier.unreserve(slots)  # (kept by the cooling entry until it ends)
            return 0
        try:
            if len(keys) > len(slots):
                raise InvalidRequest(f"{len(keys)} keys for {len(slots)} reserved slots")
            views = [slot.view for slot in slots[: len(keys)]]
            return self.pages.put(list(zip(keys, views, strict=True)), copy=False)
        finally:
            self.tier.unreserve(slots)

    @property
    def num_reservations(self) -> int:
        with self._lock:
            expired = self._expire(time.monotonic())
            count = len(self._table)
        self._end(expired)
        return count

    def close(self) -> None:
        with self._lock:
            garbage = [*self._table.values(), *self._cooling]
            self._table.clear()
            self._cooling.clear()
        del garbage

    def _expire(self, now: float) -> tuple[list, list[list[ReservedSlot]]]:
        """(lock held) Move expired reservations' slots to cooling and drop ended cooling.
        Returns (what was dropped, the expired reservations' slots) for `_end` once the lock
        is released: ending a reservation takes the tier's lock, a slot going back the slots'
        lock, and either may be held by a thread waiting for this one."""
        ended: list[list[ReservedSlot]] = []
        while self._table and next(iter(self._table.values()))[0] <= now:
            _, (end, slots) = self._table.popitem(last=False)
            ended.append(slots)
            self._cooling.append((end + self.ttl_s, slots))  # one TTL past its end
        garbage = [entry for entry in self._cooling if entry[0] <= now]  # (maybe just added)
        if garbage:
            self._cooling = [entry for entry in self._cooling if entry[0] > now]
        return garbage, ended

    def _end(self, expired: tuple[list, list[list[ReservedSlot]]]) -> None:
        """(lock not held) End the tier's reservations of expired slots (still held by
        cooling), then drop the rest (their slots go back)."""
        garbage, ended = expired
        for slots in ended:
            self.tier.unreserve(slots)
        garbage.clear()
