"""A StoreClient's same-host shared-memory puts: one copy from the caller's buffer to the tier.

ReservePages(shared_memory) reserves slots in the server's shared page arenas and names the
arena files; this client maps them (the segment pool's arena maps, the same mappings mapped gets
read from and that the pool's hooks page-lock), copies each page into its slot (memmove on the
bulk pool, the GIL released) and commits them (CommitPages: the server checks every page's
header, key and checksum before any becomes visible; one bad page stores none). The server side:
cachestore/shm/slot_puts.py.

StoreClient tries this first whenever it uses shared memory (a same-host target), before the
NIXL plane and the gRPC frames. A server that declines (the peer is not on its host, its arenas
are not shared memory, an older server) or whose files cannot be mapped here (another user's
store) is not asked again for CALLS_AFTER_DECLINE puts: the pages go the next way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from kvmesh.cachestore.client.page_gets import Metadata, by_page_size
from kvmesh.cachestore.errors import InvalidRequest, ProtocolError, SegmentUnusable
from kvmesh.cachestore.rpc import wire
from kvmesh.cachestore.rpc.status import typed_error
from kvmesh.cachestore.shm.maps import MappedFile, SegmentMaps
from kvmesh.cachestore.shm.segments import buffer_address, copy_many
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)
CALLS_AFTER_DECLINE = 64  # puts that skip shared memory after a server declined it

Pages = Sequence[tuple[bytes, bytes | memoryview]]


class _Declined(Exception):
    """The server will not (or this client cannot) put through its shared arenas."""


class SharedPuts:
    """Thread-safe. `maps`: where the server's arena files are mapped (the client's
    SegmentPool.arenas; its owner closes it). Counters: `num_pages_copied` into slots."""

    def __init__(self, target: str, channel: grpc.Channel, maps: SegmentMaps,
                 timeout: float | None, metadata: Metadata) -> None:
        self.target, self._maps = target, maps
        self.timeout, self._metadata = timeout, metadata
        method = f"/{wire.SERVICE}/"
        self._reserve = channel.unary_unary(method + "ReservePages",
                                            store_pb2.ReservePagesRequest.SerializeToString,
                                            store_pb2.ReservePagesResponse.FromString)
        self._commit = channel.unary_unary(method + "CommitPages",
                                           store_pb2.CommitPagesRequest.SerializeToString,
                                           store_pb2.CommitPagesResponse.FromString)
        self._lock = threading.Lock()
        self._calls_off = 0  # after a decline: puts left that do not ask
        self._reasons_logged: set[str] = set()
        self.num_pages_copied = 0

    def try_put(self, pages: Pages, arenas: dict[str, int]) -> tuple[int, list]:
        """Put what fits through the server's shared arenas, one reservation per page size:
        (pages newly stored, the (key, page) pairs left for the caller to send another way:
        no slot for them, the reservation expired, or the server declined). Adds the arena
        files the pages landed in to `arenas`. Raises InvalidRequest, storing nothing of that
        page size, when the server finds a bad page."""
        with self._lock:
            if self._calls_off:
                self._calls_off -= 1
                return 0, list(pages)
        stored, rest = 0, list[tuple[bytes, bytes | memoryview]]()
        groups = list(by_page_size(pages).values())
        for i, group in enumerate(groups):
            try:
                num_stored, num_sent = self._put(group, arenas)
            except _Declined as exc:
                self._decline(str(exc))
                return stored, rest + [page for later in groups[i:] for page in later]
            stored += num_stored
            rest += group[num_sent:]
        return stored, rest

    def _put(self, pages: Sequence[tuple[bytes, memoryview]], arenas: dict[str, int]
             ) -> tuple[int, int]:
        """Reserve, copy, commit pages of one size: (newly stored, how many leading pages
        went this way)."""
        nbytes = pages[0][1].nbytes
        reply = self._reserve_slots(len(pages), nbytes)
        if not reply.reservation_id:
            return 0, 0
        try:
            files = self._map(reply, len(pages), nbytes)
        except BaseException:
            self._abort(reply.reservation_id)
            raise
        try:
            copy_many([(files[s.arena_id].address + s.offset, buffer_address(view)[0], nbytes)
                       for s, (_, view) in zip(reply.slots, pages, strict=False)])
        except BaseException:
            self._abort(reply.reservation_id)
            raise
        finally:
            for file in set(files.values()):
                self._maps.release(file)
        num_sent = len(reply.slots)
        self.num_pages_copied += num_sent
        commit = self._call(self._commit, store_pb2.CommitPagesRequest(
            reservation_id=reply.reservation_id, keys=[key for key, _ in pages[:num_sent]]))
        if commit.is_expired:  # (a very slow copy, or a very short lease_s): another way
            log.warning("store %s: shared-memory reservation expired before its commit; %d "
                        "pages go another way", self.target, num_sent)
            return 0, 0
        arenas.update((a.name, a.nbytes) for a in reply.shared_arenas)
        return commit.num_pages_stored, num_sent

    def _reserve_slots(self, num_pages: int, nbytes: int) -> Any:
        """ReservePages(shared_memory). Raises _Declined when the server will not."""
        request = store_pb2.ReservePagesRequest(num_pages=num_pages, page_nbytes=nbytes,
                                                shared_memory=True)
        try:
            reply = self._reserve(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server older than ReservePages
                raise _Declined("the server has no ReservePages") from None
            error = typed_error(exc)
            if isinstance(error, InvalidRequest):  # one older than shared-memory reservations
                raise _Declined(f"ReservePages refused: {error}") from None
            raise error from None
        if reply.shared_memory_declined:
            raise _Declined(reply.shared_memory_declined)
        if reply.reservation_id and not reply.shared_arenas:  # it reserved NIXL slots
            self._abort(reply.reservation_id)
            raise _Declined("the server does not know shared-memory reservations")
        return reply

    def _map(self, reply: Any, num_pages: int, nbytes: int) -> dict[int, MappedFile]:
        """{arena_id: its file mapped (released by the caller)} for the reply's slots, which
        are checked to fit. Raises ProtocolError, or _Declined when a file cannot be mapped."""
        named = {a.arena_id: a for a in reply.shared_arenas}
        if (not named or not reply.slots or len(reply.slots) > num_pages
                or any(s.nbytes != nbytes or s.arena_id not in named
                       or s.offset + nbytes > named[s.arena_id].nbytes for s in reply.slots)):
            raise ProtocolError("ReservePages answered slots that do not fit the request")
        files: dict[int, MappedFile] = {}
        try:
            for arena_id in {s.arena_id for s in reply.slots}:
                arena = named[arena_id]
                files[arena_id] = self._maps.acquire(arena.name, arena.nbytes)
        except SegmentUnusable as exc:
            for file in files.values():
                self._maps.release(file)
            raise _Declined(f"cannot map the store's arena: {exc}") from None
        except BaseException:
            for file in files.values():
                self._maps.release(file)
            raise
        return files

    def _abort(self, reservation_id: int) -> None:
        """End a reservation whose slots were not (all) written: a commit of no keys."""
        try:
            self._call(self._commit, store_pb2.CommitPagesRequest(reservation_id=reservation_id))
        except Exception:  # (it expires by itself)
            log.info("store %s: aborting reservation %d failed", self.target, reservation_id)

    def _decline(self, reason: str) -> None:
        with self._lock:
            self._calls_off = CALLS_AFTER_DECLINE
            is_new = reason not in self._reasons_logged
            self._reasons_logged.add(reason)
        if is_new:
            log.info("store %s: puts not through shared memory (%s)", self.target, reason)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise typed_error(exc) from None
