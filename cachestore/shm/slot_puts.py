"""Server side of same-host shared-memory puts: slots reserved in the cpu tier's shared arenas
(files in /dev/shm, cachestore/tiers/slots.py), named for a client on this host that maps the
files and copies its pages into the slots itself: one copy from the client's buffer to the tier,
no transfer engine, no bytes through gRPC. The client then calls CommitPages, which checks every
page (header, key, checksum) before any becomes visible, exactly as for a NIXL WRITE
(cachestore/store/reservations.py: TTL, abort, cooling). The client: cachestore/client/shm_puts.py.

Trust: as for mapped gets (leases.py), only same-host peers are offered this, and only they can
open the files (mode 0600, the server's user). A client can write only bytes the store then
checks; a slot written after its commit or expiry is caught by the check every reader runs.
"""

from __future__ import annotations

from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.store.reservations import SlotReservations
from kvmesh.cachestore.tiers.cpu import ReservedSlot
from kvmesh.v1 import store_pb2


def reserve_reply(reservations: SlotReservations, num_slots: int, nbytes: int, peer: str
                  ) -> store_pb2.ReservePagesResponse:
    """ReservePages(shared_memory): up to `num_slots` slots of `nbytes` in shared arenas under
    a new reservation, and the arena files they lie in; declined (no slot reserved, the reason
    in `shared_memory_declined`) for a peer not on this host or a tier whose arenas are not
    shared. Slots in an arena that fell back to plain memory (/dev/shm full) go back at once,
    so a reply may hold fewer slots than asked, or none (reservation id 0)."""
    tier = reservations.tier
    reply = store_pb2.ReservePagesResponse(reservation_ms=int(reservations.ttl_s * 1000))
    if not segments.is_local_peer(peer):
        reply.shared_memory_declined = "the client is not on the store's host"
    elif not tier.is_shared or tier.slots is None:
        reply.shared_memory_declined = "the store's page arenas are not shared memory"
    if reply.shared_memory_declined:
        return reply
    assert tier.slots is not None
    kept: list[ReservedSlot] = []
    lost: list[ReservedSlot] = []
    arenas: dict[int, tuple[str, int]] = {}
    for slot in reservations.take(num_slots, nbytes):
        place = tier.slots.shared_arena(slot.address, nbytes)
        if place is None:
            lost.append(slot)
            continue
        arena_id, name, offset, arena_nbytes = place
        kept.append(slot)
        arenas[arena_id] = (name, arena_nbytes)
        reply.slots.add(arena_id=arena_id, offset=offset, nbytes=nbytes)
    if lost:
        reservations.give_back(lost)
    reply.reservation_id = reservations.hold(kept) if kept else 0
    if not reply.reservation_id:
        del reply.slots[:]
        return reply
    reply.shared_arenas.extend(store_pb2.SharedArena(arena_id=arena_id, name=name, nbytes=size)
                               for arena_id, (name, size) in arenas.items())
    return reply
