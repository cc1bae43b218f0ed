"""The data-plane control RPCs of the servicer (DataPlaneHello, LeasePages, ReservePages,
CommitPages) as functions from a StoreDataPlane (cachestore/dataplane/store_side.py), or the
store's SlotReservations (cachestore/store/reservations.py: CommitPages of either kind of
reservation, ReservePages in shared memory, cachestore/shm/slot_puts.py), to their replies; the
servicer checks scopes and calls these."""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.cachestore.dataplane.store_side import StoreDataPlane
from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.rpc import server_messages
from kvmesh.cachestore.shm import slot_puts
from kvmesh.cachestore.store.reservations import SlotReservations
from kvmesh.v1 import store_pb2


def _location(place: tuple[int, int, int]) -> store_pb2.PageLocation:
    arena_id, offset, nbytes = place
    return store_pb2.PageLocation(arena_id=arena_id, offset=offset, nbytes=nbytes)


def hello_reply(plane: StoreDataPlane | None) -> store_pb2.DataPlaneHelloResponse:
    if plane is None:
        return store_pb2.DataPlaneHelloResponse(is_offered=False)
    hello = plane.hello()
    return store_pb2.DataPlaneHelloResponse(
        is_offered=True, agent_name=hello.agent_name, agent_metadata=hello.agent_metadata,
        arenas=[store_pb2.DataPlaneArena(arena_id=a.arena_id, address=a.address, nbytes=a.nbytes)
                for a in hello.arenas],
        arena_epoch=hello.arena_epoch)


def lease_reply(plane: StoreDataPlane, request: store_pb2.PageKeys
                ) -> store_pb2.LeasePagesResponse:
    keys = server_messages.page_keys(request)
    lease_id, places, elsewhere, epoch = plane.lease(keys, request.prefix_only)
    return store_pb2.LeasePagesResponse(
        is_found=[place is not None for place in places],
        pages=[_location(place) for place in places if place is not None],
        is_elsewhere=elsewhere, lease_id=lease_id, lease_ms=int(plane.ttl_s * 1000),
        arena_epoch=epoch)


def reserve_reply(plane: StoreDataPlane | None, reservations: SlotReservations | None,
                  request: store_pb2.ReservePagesRequest, peer: str
                  ) -> store_pb2.ReservePagesResponse:
    """Slots in shared arena files (request.shared_memory: the peer copies pages in itself),
    else in the plane's registered arenas. Raises InvalidRequest for a page size no page has,
    or when the server has no slots of that kind to offer."""
    if request.page_nbytes > server_messages.MAX_PAGE_NBYTES:  # (the table checks the least)
        raise InvalidRequest(f"ReservePages: page_nbytes {request.page_nbytes} is more than "
                             f"{server_messages.MAX_PAGE_NBYTES} (one encoded page)")
    if request.shared_memory:
        if reservations is None:  # a cpu tier without slot arenas
            return store_pb2.ReservePagesResponse(
                shared_memory_declined="the store's cpu tier keeps no slot arenas")
        return slot_puts.reserve_reply(reservations, request.num_pages, request.page_nbytes,
                                       peer)
    if plane is None:
        raise InvalidRequest("this server offers no data plane (DataPlaneHello); ReservePages "
                             "with shared_memory needs none")
    reservation_id, places, epoch = plane.reserve(request.num_pages, request.page_nbytes)
    return store_pb2.ReservePagesResponse(
        reservation_id=reservation_id, slots=[_location(place) for place in places],
        reservation_ms=int(plane.ttl_s * 1000), arena_epoch=epoch)


def commit_reply(reservations: SlotReservations | None, request: store_pb2.CommitPagesRequest
                 ) -> store_pb2.CommitPagesResponse:
    keys: Sequence[bytes] = server_messages.page_keys(store_pb2.PageKeys(keys=request.keys))
    if len(set(keys)) != len(keys):
        raise InvalidRequest("CommitPages: a key appears twice")
    num_stored = reservations.commit(request.reservation_id, keys) if reservations else None
    return store_pb2.CommitPagesResponse(num_pages_stored=num_stored or 0,
                                         is_expired=num_stored is None)
