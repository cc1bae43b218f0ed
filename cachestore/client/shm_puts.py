"""A StoreClient's same-host shared-memory puts: one copy from the caller's buffer to the tier.

ReservePages(shared_memory) reserves slots in the server's shared page arenas and names the
arena files; this client maps them (the segment pool's arena maps, the same mappings mapped gets
read from and that the pool's hooks page-lock), fills each slot (cachestore/client/slot_fill.py:
an encoded page copied, or a payload encoded in place; memmove and xxh3 on the bulk pool, the GIL
released) and commits them (CommitPages: the server checks every page's header, key and checksum
before any becomes visible; one bad page stores none of its batch). Pages go BATCH_NBYTES a
reservation, and a batch's commit runs on the server while the next batch is reserved and
filled. The server side: cachestore/shm/slot_puts.py.

StoreClient tries this first whenever it uses shared memory (a same-host target), before the
NIXL plane and the gRPC frames. A server that declines (the peer is not on its host, its arenas
are not shared memory, an older server) or whose files cannot be mapped here (another user's
store) is not asked again for CALLS_AFTER_DECLINE puts: the pages go the next way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from kvmesh.cachestore.client.page_gets import Metadata, by_page_size
from kvmesh.cachestore.client.slot_fill import EncodedPages, PayloadPage, PayloadPages
from kvmesh.cachestore.errors import InvalidRequest, ProtocolError, SegmentUnusable
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc import wire
from kvmesh.cachestore.rpc.status import typed_error
from kvmesh.cachestore.shm.maps import MappedFile, SegmentMaps
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)
CALLS_AFTER_DECLINE = 64  # puts that skip shared memory after a server declined it

# pages a reservation asks for, by bytes: large enough that a call's cost is small beside its
# copies, small enough that the commit left after the last copy is short
BATCH_NBYTES = 32 << 20
MAX_SLOTS_PER_RESERVATION = 1 << 14  # the server's limit (cachestore/store/reservations.py)

Pages = Sequence[tuple[bytes, bytes | memoryview]]


class SlotFiller(Protocol):
    """Pages of one size (`nbytes` encoded) to write into reserved slots (slot_fill.py)."""

    keys: list[bytes]
    nbytes: int

    def fill(self, start: int, addresses: Sequence[int]) -> None: ...


@dataclass
class _Commit:
    """A CommitPages in flight: its future, pages and the arena files they lie in."""

    future: Any
    num_pages: int
    shared_arenas: Any


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
        """Put what fits through the server's shared arenas, by page size: (pages newly
        stored, the (key, page) pairs left for the caller to send another way: no slot for
        them, a reservation expired, or the server declined). Adds the arena files the pages
        landed in to `arenas`. Raises InvalidRequest when the server finds a bad page (that
        batch is not stored)."""
        if self._is_off():
            return 0, list(pages)
        stored, rest = 0, list[tuple[bytes, bytes | memoryview]]()
        groups = list(by_page_size(pages).values())
        for i, group in enumerate(groups):
            try:
                num_stored, num_sent = self._put(EncodedPages(group), arenas)
            except _Declined as exc:
                self._decline(str(exc))
                return stored, rest + [page for later in groups[i:] for page in later]
            stored += num_stored
            rest += group[num_sent:]
        return stored, rest

    def try_put_from(self, ns: Namespace, pages: Sequence[PayloadPage],
                     arenas: dict[str, int]) -> tuple[int, int]:
        """Like try_put for pages of `ns` given as (key, token ids, payload): each is encoded
        straight into its slot (slot_fill.PayloadPages: one copy of the payload, hashed
        there). Returns (pages newly stored, how many leading pages went this way; the
        caller sends the rest another way). Raises InvalidRequest for a page of the wrong
        size, or one the server finds bad."""
        fill = PayloadPages(ns, pages)
        if not pages or self._is_off():
            return 0, 0
        try:
            return self._put(fill, arenas)
        except _Declined as exc:
            self._decline(str(exc))
            return 0, 0

    def _is_off(self) -> bool:
        """After a decline: True (this put does not ask) for CALLS_AFTER_DECLINE puts."""
        with self._lock:
            if self._calls_off:
                self._calls_off -= 1
                return True
            return False

    def _put(self, pages: SlotFiller, arenas: dict[str, int]) -> tuple[int, int]:
        """Reserve, fill and commit pages of one size, BATCH_NBYTES a reservation, pipelined:
        the next batch's slots are asked for before this batch is filled, and a batch's
        commit (the server checking it) runs while the next batch is filled. Returns (newly
        stored, how many leading pages went this way: none past a short reservation or an
        expired one). Raises what a commit raises (InvalidRequest: that batch is not stored,
        the ones committed before it are)."""
        keys, nbytes = pages.keys, pages.nbytes
        per_batch = max(1, min(MAX_SLOTS_PER_RESERVATION, BATCH_NBYTES // nbytes))
        stored = sent = 0  # sent: leading pages committed, or in the commit in flight
        in_flight: _Commit | None = None
        asked: Any = self._ask_slots(min(per_batch, len(keys)), nbytes)  # a future reply
        try:
            while asked is not None:
                want, reply = len(keys) - sent, self._slots(asked)
                want, asked = min(per_batch, want), None
                if not reply.reservation_id:
                    break
                num = len(reply.slots)
                if num == want and sent + num < len(keys):  # the next batch's, meanwhile
                    asked = self._ask_slots(min(per_batch, len(keys) - sent - num), nbytes)
                self._fill(reply, pages, sent)
                if in_flight is not None:
                    landed, in_flight = in_flight, None
                    num_stored = self._land(landed, arenas, abort=reply.reservation_id)
                    if num_stored is None:  # expired: this batch and that one go another way
                        return stored, sent - landed.num_pages
                    stored += num_stored
                in_flight = _Commit(self._commit.future(
                    store_pb2.CommitPagesRequest(reservation_id=reply.reservation_id,
                                                 keys=keys[sent : sent + num]),
                    timeout=self.timeout, metadata=self._metadata), num, reply.shared_arenas)
                sent += num
            if in_flight is not None:
                landed, in_flight = in_flight, None
                num_stored = self._land(landed, arenas)
                if num_stored is None:
                    return stored, sent - landed.num_pages
                stored += num_stored
            return stored, sent
        finally:
            if in_flight is not None:  # raised meanwhile: that commit still ends first
                in_flight.future.exception()
            if asked is not None:  # slots asked for and not used
                self._drop_asked(asked)

    def _fill(self, reply: Any, pages: SlotFiller, start: int) -> int:
        """Fill the reply's slots with pages[start:]: how many. Aborts the reservation when
        that fails."""
        try:
            files = self._map(reply, len(pages.keys) - start, pages.nbytes)
        except BaseException:
            self._abort(reply.reservation_id)
            raise
        try:
            pages.fill(start, [files[s.arena_id].address + s.offset for s in reply.slots])
        except BaseException:
            self._abort(reply.reservation_id)
            raise
        finally:
            for file in set(files.values()):
                self._maps.release(file)
        self.num_pages_copied += len(reply.slots)
        return len(reply.slots)

    def _land(self, commit: _Commit, arenas: dict[str, int], abort: int = 0) -> int | None:
        """Wait for a commit: pages newly stored, None when its reservation had expired. Adds
        where they landed to `arenas`. On expiry or error, reservation `abort` (the next
        batch's, filled meanwhile) is aborted."""
        try:
            reply = commit.future.result()
        except grpc.RpcError as exc:
            if abort:
                self._abort(abort)
            raise typed_error(exc) from None
        if reply.is_expired:  # (a very slow copy, or a very short lease_s): another way
            if abort:
                self._abort(abort)
            log.warning("store %s: shared-memory reservation expired before its commit; %d "
                        "pages go another way", self.target, commit.num_pages)
            return None
        arenas.update((a.name, a.nbytes) for a in commit.shared_arenas)
        return reply.num_pages_stored

    def _reserve_slots(self, num_pages: int, nbytes: int) -> Any:
        """ReservePages(shared_memory), waited for. Raises _Declined when the server will not."""
        return self._slots(self._ask_slots(num_pages, nbytes))

    def _ask_slots(self, num_pages: int, nbytes: int) -> Any:
        """ReservePages(shared_memory) sent: its future, for `_slots`."""
        request = store_pb2.ReservePagesRequest(num_pages=num_pages, page_nbytes=nbytes,
                                                shared_memory=True)
        return self._reserve.future(request, timeout=self.timeout, metadata=self._metadata)

    def _slots(self, asked: Any) -> Any:
        """The reply to `_ask_slots`. Raises _Declined when the server will not."""
        try:
            reply = asked.result()
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

    def _drop_asked(self, asked: Any) -> None:
        """End the reservation a `_ask_slots` that will not be used got, if it got one."""
        try:
            reply = asked.result()
        except Exception:  # (nothing reserved)
            return
        if reply.reservation_id:
            self._abort(reply.reservation_id)

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
