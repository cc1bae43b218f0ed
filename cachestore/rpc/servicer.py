"""The KVStore servicer: thin RPC methods over a TieredStore (request checks live in
server_messages.py, the error table in status.py, bearer-token scopes in auth.py), and the
method-handler table that registers them with wire.py's frame (de)serializers, the bulk streams
under streams.py's limit and idle watchdog. Assembled into a running server by server.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import wraps
from typing import Any

import grpc

from kvmesh.cachestore.dataplane.store_side import StoreDataPlane
from kvmesh.cachestore.errors import Forbidden, InvalidRequest, StreamsExhausted
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc import dataplane_server, lookup_server, server_messages, wire
from kvmesh.cachestore.rpc.auth import Scope, TokenTable, scoped_namespace
from kvmesh.cachestore.rpc.status import status_of
from kvmesh.cachestore.rpc.streams import BulkStreams
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.leases import MappedLeases
from kvmesh.cachestore.shm.server import SegmentWriter
from kvmesh.cachestore.store.page_access import PageAccess
from kvmesh.cachestore.store.reservations import SlotReservations
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.v1 import store_pb2


def _mapped(method: Callable) -> Callable:
    """Turn a typed error raised by a servicer method into its status code and message."""

    @wraps(method)
    def call(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, wire.BadMessage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method.__name__}: {request.reason}")
        try:
            return method(self, request, context)
        except Exception as exc:
            code = status_of(exc)
            if code is None:
                raise  # a bug: grpc answers UNKNOWN and logs it
            context.abort(code, str(exc))

    return call


class KVStoreServicer:
    """Thin RPC methods over a TieredStore; streaming replies are computed before they start, so
    every error is known up front and mapped to its status."""

    def __init__(self, store: TieredStore, segments: SegmentWriter | None = None,
                 leases: MappedLeases | None = None, tokens: TokenTable | None = None,
                 data_plane: StoreDataPlane | None = None,
                 reservations: SlotReservations | None = None) -> None:
        self.store = store
        self.data_plane = data_plane  # None: DataPlaneHello says it is not offered
        # slots clients fill themselves (NIXL WRITE or a same-host copy), made visible by
        # CommitPages; None: the cpu tier keeps no slot arenas (neither kind of put)
        self.reservations = reservations or (data_plane.reservations if data_plane else None)
        self.tokens = tokens or TokenTable()
        self.pages = PageAccess(store)
        self.segments = segments  # None: GetPages always answers inline
        self.leases = leases  # None: GetPages never answers with mapped pages
        self.lookup_port = 0  # the lookup socket's (lookup_server.py), set by the server; 0: none

    def _scope(self, context: grpc.ServicerContext) -> Scope:
        metadata = dict(context.invocation_metadata() or ())
        scope = self.tokens.scope_of(metadata.get("authorization"))
        if scope is None:  # BearerAuth turned it away already; kept for servers without it
            raise PermissionError("missing or wrong bearer token")
        return scope

    def _namespace(self, ns: Namespace, context: grpc.ServicerContext, *, write: bool) -> Namespace:
        """The namespace a call may touch: a client token's own tenant's, whatever the body says."""
        return scoped_namespace(ns, self._scope(context), write=write)

    def _require_internal(self, context: grpc.ServicerContext) -> None:
        if not self._scope(context).is_internal:
            raise Forbidden("page-key calls need the deployment's internal token; client tokens "
                            "may use Put, GetClosest, Lookup, Delete and Stats")

    @_mapped
    def Put(self, request_iterator: Iterator, context: grpc.ServicerContext):
        ns, token_ids, payloads = server_messages.receive_put(request_iterator)
        ns = self._namespace(ns, context, write=True)
        stored = self.store.put(ns, token_ids, payloads)
        return store_pb2.PutResponse(num_pages_stored=stored, num_pages=len(payloads))

    @_mapped
    def GetClosest(self, request, context: grpc.ServicerContext):
        ns, token_ids = server_messages.parse_tokens_request(request)
        ns = self._namespace(ns, context, write=False)
        closest = self.store.get_closest(ns, token_ids)
        return server_messages.closest_reply(ns, closest)

    @_mapped
    def Lookup(self, request, context: grpc.ServicerContext):
        return lookup_server.answer(self.store, self._scope(context), request)

    @_mapped
    def LookupHello(self, request, context: grpc.ServicerContext):
        self._scope(context)  # any accepted token: client tokens may Lookup too
        return store_pb2.LookupHelloResponse(port=self.lookup_port)

    @_mapped
    def Delete(self, request, context: grpc.ServicerContext):
        ns, token_ids = server_messages.parse_tokens_request(request)
        ns = self._namespace(ns, context, write=True)
        indices = list(request.page_indices) or None
        deleted = self.store.delete(ns, token_ids, indices)
        return store_pb2.DeleteResponse(num_pages_deleted=deleted)

    @_mapped
    def Stats(self, request, context: grpc.ServicerContext):
        return store_pb2.StatsResponse(tiers=[wire.stats_to_proto(s) for s in self.store.stats()])

    @_mapped
    def HasPages(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        keys = server_messages.page_keys(request)
        return store_pb2.HasPagesResponse(is_present=self.pages.has(keys))

    @_mapped
    def GetPages(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        keys = server_messages.page_keys(request)
        is_mapped = request.accept_mapped and self.leases is not None
        if not is_mapped and (self.segments is None or not request.HasField("segment")):
            pages = self.pages.get(keys, prefix_only=request.prefix_only)
            return server_messages.pages_reply(pages)
        # checked by the client (mapped), on their copies in the segment (one read of each
        # page), or before going inline
        blobs = self.pages.get(keys, prefix_only=request.prefix_only, verify=False)
        if is_mapped:
            assert self.leases is not None
            header = self.leases.mapped_header(keys, blobs, context.peer())
            if header is not None:
                return iter((header,))
        if self.segments is None or not request.HasField("segment"):
            return server_messages.pages_reply(self.pages.verify(keys, blobs))
        by_key = dict(zip(keys, blobs, strict=True))

        def drop_bad(bad: list[bytes]) -> None:  # a copy failed its check: is the source bad?
            self.pages.verify(bad, [by_key[key] for key in bad])

        header = self.segments.write_pages(request.segment, blobs, context.peer(), keys,
                                           on_bad=drop_bad)
        if header is not None:
            return iter((header,))
        return server_messages.pages_reply(self.pages.verify(keys, blobs))

    @_mapped
    def ReleasePages(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        released = self.leases.release(request.lease_ids) if self.leases is not None else 0
        if self.data_plane is not None:  # (one id space: the server hands both tables ids)
            released += self.data_plane.release(request.lease_ids)
        if request.bad_keys:  # the client's word is not enough: check them, drop the bad ones
            self.pages.get(server_messages.page_keys(store_pb2.PageKeys(keys=request.bad_keys)))
        return store_pb2.ReleasePagesResponse(num_released=released)

    @_mapped
    def PutPages(self, request_iterator: Iterator, context: grpc.ServicerContext):
        self._require_internal(context)
        pages = server_messages.receive_pages(request_iterator)
        reply = store_pb2.PutPagesResponse(num_pages_stored=self.pages.put(pages))
        self._name_arenas(reply, [key for key, _ in pages], context)
        return reply

    def _name_arenas(self, reply: Any, keys: Sequence[bytes],
                     context: grpc.ServicerContext) -> None:
        """Same-host peers of a shared cpu tier: the arenas holding `keys`' pages, in `reply`."""
        if self.leases is not None and segments.is_local_peer(context.peer()):
            arenas = self.leases.tier.arenas_of(keys)
            reply.arena_names.extend(arenas)
            reply.arena_nbytes.extend(arenas.values())

    @_mapped
    def DeletePages(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        deleted = self.pages.delete(server_messages.page_keys(request))
        return store_pb2.DeleteResponse(num_pages_deleted=deleted)

    @_mapped
    def DataPlaneHello(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        return dataplane_server.hello_reply(self.data_plane)

    @_mapped
    def LeasePages(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        return dataplane_server.lease_reply(self._plane(), request)

    @_mapped
    def ReservePages(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        return dataplane_server.reserve_reply(self.data_plane, self.reservations, request,
                                              context.peer())

    @_mapped
    def CommitPages(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        reply = dataplane_server.commit_reply(self.reservations, request)
        self._name_arenas(reply, request.keys, context)
        return reply

    def _plane(self) -> StoreDataPlane:
        if self.data_plane is None:
            raise InvalidRequest("this server offers no data plane (DataPlaneHello)")
        return self.data_plane


def _admit(streams: BulkStreams, context: grpc.ServicerContext) -> Any:
    try:
        return streams.admit(context)
    except StreamsExhausted as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))


def _bulk_in(method: Callable, streams: BulkStreams) -> Callable:
    """A client-streaming method under the bulk stream limit and idle watchdog."""

    def call(request_iterator: Iterator, context: grpc.ServicerContext) -> Any:
        stream = _admit(streams, context)
        try:
            return method(stream.requests(request_iterator), context)
        finally:
            stream.release()

    return call


def _bulk_out(method: Callable, streams: BulkStreams) -> Callable:
    """A server-streaming method under the bulk stream limit and idle watchdog."""

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        stream = _admit(streams, context)
        try:
            replies = method(request, context)
        except BaseException:
            stream.release()
            raise
        return stream.replies(replies)

    return call


def method_handlers(servicer: KVStoreServicer, streams: BulkStreams) -> grpc.GenericRpcHandler:
    """Method handlers with the frame (de)serializers of cachestore.wire for the bulk streams,
    which run under `streams`' limit and idle watchdog."""
    pb = store_pb2
    unary = grpc.unary_unary_rpc_method_handler

    def plain(method: Callable, request_type: type) -> grpc.RpcMethodHandler:
        return unary(method, request_deserializer=wire.make_parser(request_type),
                     response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(wire.SERVICE, {
        "Put": grpc.stream_unary_rpc_method_handler(
            _bulk_in(servicer.Put, streams),
            request_deserializer=wire.make_deserializer(pb.PutRequest),
            response_serializer=pb.PutResponse.SerializeToString),
        "GetClosest": grpc.unary_stream_rpc_method_handler(
            _bulk_out(servicer.GetClosest, streams),
            request_deserializer=wire.make_parser(pb.GetClosestRequest),
            response_serializer=wire.make_serializer(pb.GetClosestHeader)),
        "Lookup": plain(servicer.Lookup, pb.LookupRequest),
        "Delete": plain(servicer.Delete, pb.DeleteRequest),
        "Stats": plain(servicer.Stats, pb.StatsRequest),
        "HasPages": plain(servicer.HasPages, pb.PageKeys),
        "GetPages": grpc.unary_stream_rpc_method_handler(
            _bulk_out(servicer.GetPages, streams),
            request_deserializer=wire.make_parser(pb.PageKeys),
            response_serializer=wire.make_serializer(pb.GetPagesHeader)),
        "PutPages": grpc.stream_unary_rpc_method_handler(
            _bulk_in(servicer.PutPages, streams),
            request_deserializer=wire.make_deserializer(pb.PutPagesRequest),
            response_serializer=pb.PutPagesResponse.SerializeToString),
        "DeletePages": plain(servicer.DeletePages, pb.PageKeys),
        "ReleasePages": plain(servicer.ReleasePages, pb.ReleasePagesRequest),
        "DataPlaneHello": plain(servicer.DataPlaneHello, pb.DataPlaneHelloRequest),
        "LeasePages": plain(servicer.LeasePages, pb.PageKeys),
        "ReservePages": plain(servicer.ReservePages, pb.ReservePagesRequest),
        "CommitPages": plain(servicer.CommitPages, pb.CommitPagesRequest),
        "LookupHello": plain(servicer.LookupHello, pb.LookupHelloRequest),
    })


__all__ = ["KVStoreServicer", "method_handlers"]
