"""The store server's side of the NIXL data plane: one agent, the cpu tier's slot arenas
registered with it for the tier's life, leases (what a client may READ) and reservations (slots
a client may WRITE, committed only after the store checked every page).

A lease keeps its pages' views referenced, so their slots are not reused until the lease is
released or expires (the tier may drop the pages meanwhile; the bytes stay). Clients check every
page they READ (header, key, checksum) and report bad ones with the release.

A reservation holds free slots of the tier (CpuTier.reserve_slots). CommitPages checks each
slot's bytes as an encoded page under its key (header + xxh3, PageAccess.put: a large commit on
the bulk pool's threads, the GIL released while hashing) and only when all pass puts them into
the tier, in place; one bad page stores none, and a failed or surplus slot goes back. An expired
reservation cannot be committed, and its slots stay out of use for one more TTL so that a late
WRITE from a slow client lands in no page; so do an aborted one's (a commit of no keys: the
client's WRITE failed, and a cut-off WRITE may still land).

Locks: the plane's lock guards leases, reservations and cooling slots, and nothing that takes
another lock runs under it (the tier's and the slots' locks are taken after it is released).
Arena registration has a lock of its own (`_register` runs under the slots' lock, from
PageSlots.take); readers take the registered arenas as one immutable snapshot, with no lock.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvmesh.cachestore.codec import header_nbytes
from kvmesh.cachestore.dataplane.agent import ArenaInfo, make_agent
from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.shm.segments import buffer_address
from kvmesh.cachestore.store.page_access import PageAccess
from kvmesh.cachestore.tiers.cpu import CpuTier

log = logging.getLogger(__name__)

MAX_LEASES = 1024
MAX_RESERVATIONS = 256
MAX_SLOTS_PER_RESERVATION = 1 << 14
MIN_PAGE_NBYTES = header_nbytes(1) + 1  # the smallest encoded page: one token, one byte

Arenas = tuple[list[tuple[int, ArenaInfo, Any]], int]  # ((address, info, registration), epoch)

Location = tuple[int, int, int]  # (arena_id, offset, nbytes)


@dataclass(frozen=True)
class Hello:
    agent_name: str
    agent_metadata: bytes
    arenas: list[ArenaInfo]
    arena_epoch: int


class StoreDataPlane:
    """Thread-safe. Owns its NIXL agent; `close` deregisters and drops it."""

    def __init__(self, tier: CpuTier, pages: PageAccess, ttl_s: float, name: str,
                 lease_ids: Any = None) -> None:
        if tier.slots is None:
            raise ValueError("the data plane needs a cpu tier with slot arenas")
        self.tier, self.pages, self.ttl_s, self.name = tier, pages, ttl_s, name
        self.agent: Any = make_agent(name, progress_thread=True)
        self._lock = threading.Lock()  # leases, reservations, cooling; never held into the tier
        self._arena_lock = threading.Lock()  # registrations (taken under the slots' lock)
        self._ids = lease_ids if lease_ids is not None else itertools.count(1)
        # registered arenas by address, and their epoch: replaced whole (under _arena_lock),
        # read with no lock
        self._arenas: Arenas = ([], 0)
        self._leases: OrderedDict[int, tuple[float, list]] = OrderedDict()
        self._reservations: OrderedDict[int, tuple[float, list]] = OrderedDict()
        self._cooling: list[tuple[float, list]] = []  # expired reservations' slots, held a TTL
        # arenas live (same address) until the tier closes: each is registered once
        tier.on_new_arena = self._register
        for arena_id, address, nbytes in tier.arenas():
            self._register(arena_id, address, nbytes)

    def _register(self, arena_id: int, address: int, nbytes: int) -> None:
        """(CpuTier.on_new_arena, under the slots' lock) Register an arena, once. An arena the
        agent will not register is logged and left off the plane: its pages are neither leased
        nor reserved (`_locate` finds no arena), they go by the gRPC frames."""
        with self._arena_lock:
            arenas, epoch = self._arenas
            if self.agent is None or any(entry[1].arena_id == arena_id for entry in arenas):
                return
            try:
                registration = self.agent.register_memory([(address, nbytes, 0, "")], "DRAM")
            except Exception as exc:  # (not the Put's fault: it stores the page all the same)
                log.warning("data plane: arena %d (%d bytes) not registered, its pages go by "
                            "the gRPC frames: %s", arena_id, nbytes, exc)
                return
            arenas = list(arenas)
            bisect.insort(arenas, (address, ArenaInfo(arena_id, address, nbytes), registration),
                          key=lambda entry: entry[0])
            self._arenas = (arenas, epoch + 1)

    @property
    def arena_epoch(self) -> int:
        return self._arenas[1]

    def hello(self) -> Hello:
        arenas, epoch = self._arenas
        return Hello(self.name, self.agent.get_agent_metadata(),
                     [info for _, info, _ in arenas], epoch)

    @staticmethod
    def _locate(arenas: list[tuple[int, ArenaInfo, Any]], address: int, nbytes: int
                ) -> Location | None:
        i = bisect.bisect_right(arenas, address, key=lambda entry: entry[0]) - 1
        if i < 0:
            return None
        start, info, _ = arenas[i]
        if address + nbytes > start + info.nbytes:
            return None
        return info.arena_id, address - start, nbytes

    # -- reads --------------------------------------------------------------------------------

    def lease(self, keys: Sequence[bytes], prefix_only: bool
              ) -> tuple[int, list[Location | None], list[bool], int]:
        """(lease id or 0 when nothing was leased, per key its location or None, per key
        whether it is stored outside the arenas (read it over gRPC), arena epoch)."""
        blobs = self.pages.get(keys, prefix_only=prefix_only, verify=False)
        places: list[Location | None] = []
        held = []
        arenas, epoch = self._arenas
        for blob in blobs:
            view = None if blob is None else memoryview(blob)
            place = None
            if view is not None and view.nbytes:
                place = self._locate(arenas, buffer_address(view)[0], view.nbytes)
            places.append(place)
            if place is not None:
                held.append(blob)
        elsewhere = [blob is not None and place is None
                     for blob, place in zip(blobs, places, strict=True)]
        if not held:
            return 0, places, elsewhere, epoch
        lease_id = self._hold(self._leases, held, MAX_LEASES)
        if lease_id == 0:  # too many leases: every found page reads over gRPC
            return 0, [None] * len(keys), [blob is not None for blob in blobs], epoch
        return lease_id, places, elsewhere, epoch

    def release(self, lease_ids: Sequence[int]) -> int:
        with self._lock:
            expired = self._expire(time.monotonic())
            released = [self._leases.pop(i) for i in lease_ids if i in self._leases]
        self._let_go(expired)
        return len(released)

    # -- writes -------------------------------------------------------------------------------

    def reserve(self, num_slots: int, nbytes: int) -> tuple[int, list[Location], int]:
        """(reservation id, the slots' locations, arena epoch); fewer slots (maybe none, id 0)
        when the tier has no memory for more, or a slot lies in an arena the agent would not
        register (it goes back)."""
        if not 0 < num_slots <= MAX_SLOTS_PER_RESERVATION or nbytes < MIN_PAGE_NBYTES:
            raise InvalidRequest(f"reserve 1..{MAX_SLOTS_PER_RESERVATION} slots of at least "
                                 f"{MIN_PAGE_NBYTES} bytes (an encoded page), not {num_slots} "
                                 f"of {nbytes} bytes")
        slots = self.tier.reserve_slots(num_slots, nbytes)
        arenas, epoch = self._arenas  # (after the slots: an arena made for them is in it)
        kept, lost = [], []
        places: list[Location] = []
        for slot in slots:
            place = self._locate(arenas, int(slot.ctypes.data), nbytes)
            if place is None:  # in an arena not registered (never written): back at once
                lost.append(slot)
            else:
                kept.append(slot)
                places.append(place)
        if lost:
            self.tier.unreserve(lost)
        del slots, lost
        if not kept:
            return 0, [], epoch
        reservation_id = self._hold(self._reservations, kept, MAX_RESERVATIONS)
        if reservation_id == 0:
            self.tier.unreserve(kept)
            return 0, [], epoch
        return reservation_id, places, epoch

    def commit(self, reservation_id: int, keys: Sequence[bytes]) -> int | None:
        """Check slot i as the encoded page of keys[i]; when every page passes, store them in
        place (PageAccess.put). Returns pages newly stored, None (nothing stored) for an
        unknown or expired reservation. Unused slots go back. Raises InvalidRequest naming
        the first bad page (nothing stored). No keys is an abort (the client's WRITE failed):
        its slots stay out of use for one TTL, as an expired reservation's, for a cut-off
        WRITE may still land in them."""
        now = time.monotonic()
        with self._lock:
            expired = self._expire(now)
            held = self._reservations.pop(reservation_id, None)
            if held is not None and not keys:
                self._cooling.append((now + self.ttl_s, held[1]))
        self._let_go(expired)
        if held is None:
            return None
        slots = held[1]
        if not keys:
            self.tier.unreserve(slots)  # (kept by the cooling entry until it ends)
            return 0
        try:
            if len(keys) > len(slots):
                raise InvalidRequest(f"{len(keys)} keys for {len(slots)} reserved slots")
            views = [slot.data.toreadonly() for slot in slots[: len(keys)]]
            return self.pages.put(list(zip(keys, views, strict=True)), copy=False)
        finally:
            self.tier.unreserve(slots)

    # -- plumbing -----------------------------------------------------------------------------

    def _hold(self, table: OrderedDict, items: list, limit: int) -> int:
        now = time.monotonic()
        with self._lock:
            expired = self._expire(now)
            if len(table) >= limit:
                entry_id = 0
            else:
                entry_id = next(self._ids)
                table[entry_id] = (now + self.ttl_s, items)
        self._let_go(expired)
        return entry_id

    def _expire(self, now: float) -> tuple[list, list[list]]:
        """(lock held) End expired leases; move expired reservations' slots to cooling. Returns
        (what was let go, the expired reservations' slots) for `_let_go` once the lock is
        released: ending a reservation takes the tier's lock, a slot going back the slots'
        lock, and either may be held by a thread waiting for this one."""
        garbage: list = []
        ended: list[list] = []
        while self._leases and next(iter(self._leases.values()))[0] <= now:
            garbage.append(self._leases.popitem(last=False))
        while self._reservations and next(iter(self._reservations.values()))[0] <= now:
            _, (_, slots) = self._reservations.popitem(last=False)
            ended.append(slots)
            self._cooling.append((now + self.ttl_s, slots))
        garbage += [entry for entry in self._cooling if entry[0] <= now]
        self._cooling = [entry for entry in self._cooling if entry[0] > now]
        return garbage, ended

    def _let_go(self, expired: tuple[list, list[list]]) -> None:
        """(lock not held) End what `_expire` returned: the tier's reservations of expired
        slots (still held by cooling), then drop the rest (slots go back)."""
        garbage, ended = expired
        for slots in ended:
            self.tier.unreserve(slots)
        garbage.clear()

    @property
    def num_leases(self) -> int:
        with self._lock:
            expired = self._expire(time.monotonic())
            count = len(self._leases)
        self._let_go(expired)
        return count

    @property
    def num_reservations(self) -> int:
        with self._lock:
            expired = self._expire(time.monotonic())
            count = len(self._reservations)
        self._let_go(expired)
        return count

    def close(self) -> None:
        self.tier.on_new_arena = None
        with self._lock:
            garbage = [*self._leases.values(), *self._reservations.values(), *self._cooling]
            self._leases.clear()
            self._reservations.clear()
            self._cooling.clear()
        del garbage
        with self._arena_lock:
            arenas, self._arenas = self._arenas[0], ([], self._arenas[1] + 1)
        for _, _, registration in arenas:
            self.agent.deregister_memory(registration)
        self.agent = None  # the agent (and its progress thread) ends here, not at exit
