"""gRPC KVStore server: the servicer (thin methods; request checks live in server_messages.py,
the error table in status.py, bearer-token auth in auth.py), health and reflection, and
`serve_store(config)`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import wraps
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.errors import Forbidden, StreamsExhausted
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.page_mac import read_secret
from kvmesh.cachestore.rpc import server_messages, wire
from kvmesh.cachestore.rpc.auth import BearerAuth, Scope, TokenTable
from kvmesh.cachestore.rpc.status import status_of
from kvmesh.cachestore.rpc.streams import BulkStreams
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.leases import MappedLeases
from kvmesh.cachestore.shm.server import SegmentWriter
from kvmesh.cachestore.store.page_access import PageAccess
from kvmesh.cachestore.store.tiered import FlushResult, TieredStore
from kvmesh.cachestore.tiers.base import Tier
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)
SERVICE = store_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name  # "kvmesh.v1.KVStore"


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
                 leases: MappedLeases | None = None, tokens: TokenTable | None = None) -> None:
        self.store = store
        self.tokens = tokens or TokenTable()
        self.pages = PageAccess(store)
        self.segments = segments  # None: GetPages always answers inline
        self.leases = leases  # None: GetPages never answers with mapped pages

    def _scope(self, context: grpc.ServicerContext) -> Scope:
        metadata = dict(context.invocation_metadata() or ())
        scope = self.tokens.scope_of(metadata.get("authorization"))
        if scope is None:  # BearerAuth turned it away already; kept for servers without it
            raise PermissionError("missing or wrong bearer token")
        return scope

    def _namespace(self, ns: Namespace, context: grpc.ServicerContext, *, write: bool) -> Namespace:
        """The namespace a call may touch: a client token's own tenant's, whatever the body says."""
        scope = self._scope(context)
        if scope.is_internal:
            return ns
        if write and not scope.can_write:
            raise Forbidden(f"this token may only read (tenant {scope.tenant!r})")
        return ns.with_salt(scope.salt)

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
        ns, token_ids = server_messages.parse_tokens_request(request)
        ns = self._namespace(ns, context, write=False)
        result = self.store.lookup(ns, token_ids)
        return store_pb2.LookupResponse(num_tokens=result.num_tokens,
                                        tiers=[wire.tier_enum(t) for t in result.tiers])

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
        if request.bad_keys:  # the client's word is not enough: check them, drop the bad ones
            self.pages.get(server_messages.page_keys(store_pb2.PageKeys(keys=request.bad_keys)))
        return store_pb2.ReleasePagesResponse(num_released=released)

    @_mapped
    def PutPages(self, request_iterator: Iterator, context: grpc.ServicerContext):
        self._require_internal(context)
        pages = server_messages.receive_pages(request_iterator)
        reply = store_pb2.PutPagesResponse(num_pages_stored=self.pages.put(pages))
        if self.leases is not None and segments.is_local_peer(context.peer()):
            arenas = self.leases.tier.arenas_of([key for key, _ in pages])
            reply.arena_names.extend(arenas)
            reply.arena_nbytes.extend(arenas.values())
        return reply

    @_mapped
    def DeletePages(self, request, context: grpc.ServicerContext):
        self._require_internal(context)
        deleted = self.pages.delete(server_messages.page_keys(request))
        return store_pb2.DeleteResponse(num_pages_deleted=deleted)


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


def _handlers(servicer: KVStoreServicer, streams: BulkStreams) -> grpc.GenericRpcHandler:
    """Method handlers with the frame (de)serializers of cachestore.wire for the bulk streams,
    which run under `streams`' limit and idle watchdog."""
    pb = store_pb2
    unary = grpc.unary_unary_rpc_method_handler

    def plain(method: Callable, request_type: type) -> grpc.RpcMethodHandler:
        return unary(method, request_deserializer=wire.make_parser(request_type),
                     response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(SERVICE, {
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
    })


def build_tiers(config: StoreConfig) -> list[Tier]:
    """Tiers in chain order from a config: cpu, then disk, redis, remote when configured."""
    # unpinned: the store never copies from its pages to a GPU itself (a same-host worker maps
    # and page-locks the shared arenas), and pinning costs time and locked memory
    tiers: list[Tier] = [CpuTier(config.cpu_bytes, pin_memory=False,
                                 shared=config.shared_memory)]
    if config.disk_dir is not None:
        from kvmesh.cachestore.tiers.disk import DiskTier

        tiers.append(DiskTier(config.disk_dir, config.disk_bytes, mac_key=read_secret(
            config.disk_mac_key, config.disk_mac_key_file, "disk MAC key")))
    if config.redis_url is not None:
        from kvmesh.cachestore.tiers.redis import RedisTier

        redis_mac_key = read_secret(config.redis_mac_key, config.redis_mac_key_file,
                                    "redis MAC key")
        if redis_mac_key is None:
            log.warning("redis tier without a MAC key: pages in Redis are forgeable by anyone "
                        "who can write it; set KVMESH_STORE_REDIS_MAC_KEY or "
                        "--redis-mac-key-file for a Redis shared with others")
        tiers.append(RedisTier(config.redis_url, ttl_seconds=config.redis_ttl,
                               mac_key=redis_mac_key))
    if config.remote is not None:
        from kvmesh.cachestore.rpc.client import StoreClient
        from kvmesh.cachestore.tiers.remote import RemoteTier

        # fail-fast is the tier's own, so the client's breaker stays off
        client = StoreClient(config.remote, token=config.remote_token,
                             tls=config.remote_tls_ca or False, timeout=5.0, breaker=None)
        tiers.append(RemoteTier(client))
    return tiers


class StoreServer:
    """A started store server. Owns its TieredStore (closed by `stop`)."""

    def __init__(self, config: StoreConfig, store: TieredStore | None = None) -> None:
        self.config = config
        tokens = TokenTable.from_config(config.token, config.token_file, config.tenant_secret)
        self.store = store if store is not None else TieredStore(build_tiers(config))
        interceptors = [BearerAuth(tokens)] if tokens.is_enabled else []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                       thread_name_prefix="kvstore"),
            interceptors=interceptors,
            options=[*wire.GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
        )
        self._segments = SegmentWriter() if config.shared_memory else None
        cpu = self.store.tiers[0] if self.store.tiers else None
        # mapped GetPages: same-host clients read the cpu tier's pages in place
        self.leases = (MappedLeases(cpu, config.lease_s)
                       if isinstance(cpu, CpuTier) and cpu.is_shared else None)
        servicer = KVStoreServicer(self.store, self._segments, self.leases, tokens)
        self.streams = BulkStreams(config.bulk_streams, config.stream_idle_s)
        self._server.add_generic_rpc_handlers((_handlers(servicer, self.streams),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = f"{config.host}:{config.port}"
        try:
            self.port = self._bind(address)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            self.store.close()
            raise OSError(f"cannot listen on {address}: {exc}") from None
        self._server.start()
        for name in ("", SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _bind(self, address: str) -> int:
        if not self.config.is_tls:
            return self._server.add_insecure_port(address)
        key = Path(self.config.tls_key).read_bytes()  # type: ignore[arg-type]
        cert = Path(self.config.tls_cert).read_bytes()  # type: ignore[arg-type]
        return self._server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops; True if it did within `timeout`."""
        return self._server.wait_for_termination(timeout)

    def stop(self, grace: float | None = 2.0, flush_s: float = 0.0) -> FlushResult | None:
        """Stop accepting calls, let running ones finish for `grace` seconds, then (`flush_s` >
        0) copy the cpu tier's pages down to the tiers below for at most about `flush_s`
        seconds (TieredStore.flush_down: what is left then is lost), close the store. Returns
        the flush's result, None when there was none."""
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.streams.close()
        flushed = self.store.flush_down(flush_s) if flush_s > 0 else None
        if self._segments is not None:
            self._segments.close()
        if self.leases is not None:
            self.leases.close()
        self.store.close()
        return flushed

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_store(config: StoreConfig, store: TieredStore | None = None) -> StoreServer:
    """Start a store server for `config` (port 0 picks a free port: see `.port`)."""
    return StoreServer(config, store)


__all__ = ["KVStoreServicer", "StoreServer", "serve_store"]
