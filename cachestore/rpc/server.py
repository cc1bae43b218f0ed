"""The KVStore server: `serve_store(config)` starts a StoreServer, which builds the tiers from
the config (`build_tiers`), serves servicer.py's KVStoreServicer with bearer-token auth, health
and reflection, and owns the store until `stop`."""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.dataplane import agent
from kvmesh.cachestore.dataplane.store_side import StoreDataPlane
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.page_mac import read_secret
from kvmesh.cachestore.rpc import lookup_server, wire
from kvmesh.cachestore.rpc.auth import BearerAuth, TokenTable
from kvmesh.cachestore.rpc.servicer import KVStoreServicer, method_handlers
from kvmesh.cachestore.rpc.streams import BulkStreams
from kvmesh.cachestore.shm.leases import MappedLeases
from kvmesh.cachestore.shm.server import SegmentWriter
from kvmesh.cachestore.store.page_access import PageAccess
from kvmesh.cachestore.store.reservations import SlotReservations
from kvmesh.cachestore.store.tiered import FlushResult, TieredStore
from kvmesh.cachestore.tiers.base import Tier
from kvmesh.cachestore.tiers.cpu import CpuTier

log = logging.getLogger(__name__)


def build_tiers(config: StoreConfig) -> list[Tier]:
    """Tiers in chain order from a config: cpu, then disk, redis, remote when configured."""
    # unpinned: the store never copies from its pages to a GPU itself (a same-host worker maps
    # and page-locks the shared arenas), and pinning costs time and locked memory
    # slots always: arenas made once and reused bound the memory, and the data plane registers
    # them, shared (/dev/shm files) or plain (anonymous mappings) for a private store alike
    tiers: list[Tier] = [CpuTier(config.cpu_bytes, pin_memory=False, slots=True,
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
        from kvmesh.cachestore.client.store_client import StoreClient
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
        lease_ids = itertools.count(1)  # one id space: ReleasePages ends leases of both kinds
        # mapped GetPages: same-host clients read the cpu tier's pages in place
        self.leases = (MappedLeases(cpu, config.lease_s, lease_ids=lease_ids)
                       if isinstance(cpu, CpuTier) and cpu.is_shared else None)
        # slots clients fill themselves: NIXL WRITEs, and same-host copies into shared arenas
        self.reservations = (SlotReservations(cpu, PageAccess(self.store), config.lease_s,
                                              lease_ids)
                             if isinstance(cpu, CpuTier) and cpu.slots is not None else None)
        try:
            # data_plane_note: which plane carries bulk bytes, for logs and `kvmesh store`
            self.data_plane, self.data_plane_note = _start_data_plane(
                config, cpu, self.reservations, lease_ids)
        except InvalidConfig:
            self.store.close()
            raise
        servicer = KVStoreServicer(self.store, self._segments, self.leases, tokens,
                                   self.data_plane, self.reservations)
        # the lookup socket sends the token as it is: only beside a plaintext gRPC port
        self.lookups = None if config.is_tls else lookup_server.listen(self.store, tokens,
                                                                       config.host)
        servicer.lookup_port = self.lookups.port if self.lookups is not None else 0
        self.streams = BulkStreams(config.bulk_streams, config.stream_idle_s)
        self._server.add_generic_rpc_handlers((method_handlers(servicer, self.streams),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (wire.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = f"{config.host}:{config.port}"
        try:
            self.port = self._bind(address)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            if self.lookups is not None:
                self.lookups.close()
            if self.data_plane is not None:
                self.data_plane.close()
            self.store.close()
            raise OSError(f"cannot listen on {address}: {exc}") from None
        self._server.start()
        for name in ("", wire.SERVICE):
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
        if self.lookups is not None:
            self.lookups.close()
        flushed = self.store.flush_down(flush_s) if flush_s > 0 else None
        if self._segments is not None:
            self._segments.close()
        if self.leases is not None:
            self.leases.close()
        if self.data_plane is not None:
            self.data_plane.close()
        if self.reservations is not None:
            self.reservations.close()
        self.store.close()
        return flushed

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start_data_plane(config: StoreConfig, cpu: Tier | None,
                      reservations: SlotReservations | None, lease_ids: itertools.count
                      ) -> tuple[StoreDataPlane | None, str]:
    """(The NIXL data plane over the cpu tier's arenas, its reservations `reservations`, or
    None: gRPC frames carry the bytes; a line saying which), logged. Raises InvalidConfig when
    config.data_plane is "nixl" and it cannot start."""
    why = ""
    if config.data_plane == "grpc":
        why = "data_plane=grpc"
    elif not isinstance(cpu, CpuTier) or reservations is None:
        why = "the cpu tier keeps no slot arenas"
    elif agent.nixl_api() is None:
        why = f"nixl unavailable ({agent.why_unavailable()})"
    if not why:
        assert isinstance(cpu, CpuTier) and reservations is not None
        name = f"kvmesh-store-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            plane = StoreDataPlane(cpu, reservations.pages, config.lease_s, name, lease_ids,
                                   reservations)
        except Exception as exc:  # a UCX that does not start here
            why = f"NIXL agent failed to start: {exc}"
        else:
            note = (f"NIXL/UCX (agent {name}, UCX_TLS={os.environ.get('UCX_TLS', 'default')});"
                    f" gRPC frames for clients without it")
            log.info("store data plane: %s", note)
            return plane, note
    if config.data_plane == "nixl":
        raise InvalidConfig(f"data_plane=nixl, but {why}")
    note = f"gRPC frames only ({why})"
    log.info("store data plane: %s", note)
    return None, note


def serve_store(config: StoreConfig, store: TieredStore | None = None) -> StoreServer:
    """Start a store server for `config` (port 0 picks a free port: see `.port`)."""
    return StoreServer(config, store)


__all__ = ["StoreServer", "build_tiers", "serve_store"]
