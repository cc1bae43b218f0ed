"""The store server's side of the NIXL data plane: one agent, the cpu tier's slot arenas
registered with it for the tier's life, leases (what a client may READ) and reservations (slots
a client may WRITE, committed only after the store checked every page).

A lease keeps its pages' views referenced, so their slots are not reused until the lease is
released or expires (the tier may drop the pages meanwhile; the bytes stay). Clients check every
page they READ (header, key, checksum) and report bad ones with the release.

Reservations, their commit checks, expiry and cooling are cachestore/store/reservations.py's
(one table with same-host shared-memory puts); this side only keeps the slots that lie in
registered arenas and says where they are.

Locks: the plane's lock guards leases, and nothing that takes another lock runs under it.
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

from kvmesh.cachestore.dataplane.agent import ArenaInfo, make_agent
from kvmesh.cachestore.shm.segments import buffer_address
from kvmesh.cachestore.store.page_access import PageAccess
from kvmesh.cachestore.store.reservations import SlotReservations
from kvmesh.cachestore.tiers.cpu import CpuTier

log = logging.getLogger(__name__)

MAX_LEASES = 1024

Arenas = tuple[list[tuple[int, ArenaInfo, Any]], int]  # ((address, info, registration), epoch)

Location = tuple[int, int, int]  # (arena_id, offset, nbytes)


@dataclass(frozen=True)
class Hello:
    agent_name: str
    agent_metadata: bytes
    arenas: list[ArenaInfo]
    arena_epoch: int


class StoreDataPlane:
    """Thread-safe. Owns its NIXL agent; `close` deregisters and drops it. `reservations`: the
    store's reservation table (shared with same-host shared-memory puts; closed by its owner);
    None makes one of its own."""

    def __init__(self, tier: CpuTier, pages: PageAccess, ttl_s: float, name: str,
                 lease_ids: Any = None, reservations: SlotReservations | None = None) -> None:
        if tier.slots is None:
            raise ValueError("the data plane needs a cpu tier with slot arenas")
        self.tier, self.pages, self.ttl_s, self.name = tier, pages, ttl_s, name
        self._ids = lease_ids if lease_ids is not None else itertools.count(1)
        self._owns_reservations = reservations is None
        self.reservations = reservations or SlotReservations(tier, pages, ttl_s, self._ids)
        self.agent: Any = make_agent(name, progress_thread=True)
        self._lock = threading.Lock()  # leases; never held into the tier
        self._arena_lock = threading.Lock()  # registrations (taken under the slots' lock)
        # registered arenas by address, and their epoch: replaced whole (under _arena_lock),
        # read with no lock
        self._arenas: Arenas = ([], 0)
        self._leases: OrderedDict[int, tuple[float, list]] = OrderedDict()
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
        lease_id = self._grant(held)
        if lease_id == 0:  # too many leases: every found page reads over gRPC
            return 0, [None] * len(keys), [blob is not None for blob in blobs], epoch
        return lease_id, places, elsewhere, epoch

    def release(self, lease_ids: Sequence[int]) -> int:
        with self._lock:
            garbage = self._expire(time.monotonic())
            released = [self._leases.pop(i) for i in lease_ids if i in self._leases]
        del garbage  # (views dropped outside the lock: a slot going back takes the slots')
        return len(released)

    # -- writes -------------------------------------------------------------------------------

    def reserve(self, num_slots: int, nbytes: int) -> tuple[int, list[Location], int]:
        """(reservation id, the slots' locations, arena epoch); fewer slots (maybe none, id 0)
        when the tier has no memory for more, or a slot lies in an arena the agent would not
        register (it goes back)."""
        slots = self.reservations.take(num_slots, nbytes)
        arenas, epoch = self._arenas  # (after the slots: an arena made for them is in it)
        kept, lost = [], []
        places: list[Location] = []
        for slot in slots:
            place = self._locate(arenas, slot.address, nbytes)
            if place is None:  # in an arena not registered (never written): back at once
                lost.append(slot)
            else:
                kept.append(slot)
                places.append(place)
        if lost:
            self.reservations.give_back(lost)
        del slots, lost
        reservation_id = self.reservations.hold(kept) if kept else 0
        return reservation_id, places if reservation_id else [], epoch

    def commit(self, reservation_id: int, keys: Sequence[bytes]) -> int | None:
        """SlotReservations.commit (either kind of reservation)."""
        return self.reservations.commit(reservation_id, keys)

    # -- plumbing -----------------------------------------------------------------------------

    def _grant(self, pages: list) -> int:
        """A lease on `pages` (their views kept referenced) for ttl_s: its id, or 0 when
        MAX_LEASES are outstanding."""
        now = time.monotonic()
        with self._lock:
            garbage = self._expire(now)
            if len(self._leases) >= MAX_LEASES:
                lease_id = 0
            else:
                lease_id = next(self._ids)
                self._leases[lease_id] = (now + self.ttl_s, pages)
        del garbage
        return lease_id

    def _expire(self, now: float) -> list:
        """(lock held) End expired leases; returns them, for the caller to drop once the lock
        is released (a slot going back takes the slots' lock)."""
        garbage: list = []
        while self._leases and next(iter(self._leases.values()))[0] <= now:
            garbage.append(self._leases.popitem(last=False))
        return garbage

    @property
    def num_leases(self) -> int:
        with self._lock:
            garbage = self._expire(time.monotonic())
            count = len(self._leases)
        del garbage
        return count

    @property
    def num_reservations(self) -> int:
        return self.reservations.num_reservations

    def close(self) -> None:
        self.tier.on_new_arena = None
        with self._lock:
            garbage = list(self._leases.values())
            self._leases.clear()
        del garbage
        if self._owns_reservations:
            self.reservations.close()
        with self._arena_lock:
            arenas, self._arenas = self._arenas[0], ([], self._arenas[1] + 1)
        for _, _, registration in arenas:
            self.agent.deregister_memory(registration)
        self.agent = None  # the agent (and its progress thread) ends here, not at exit
