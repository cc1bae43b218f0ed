"""Run a worker: gRPC server (Worker + health + reflection) around an EngineLoop.

`serve_worker(config, host, port)` is the in-process entry (the CLI and Ray actors call it): it
binds the port, loads the model on the engine-loop thread, flips health to SERVING and returns a
handle. Health reads NOT_SERVING while the model loads and after stop() begins.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.cachestore.rpc.auth import BearerAuth
from kvmesh.cachestore.rpc.wire import GRPC_OPTIONS
from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.service.aio_server import AioServer
from kvmesh.workers.service.aio_servicer import AioWorkerServicer, wake_streams
from kvmesh.workers.service.engine_loop import EngineLoop
from kvmesh.workers.service.servicer import WorkerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name  # "kvmesh.v1.Worker"
# On the sync server, Generate and KvEvents hold a thread each for their whole stream; KvEvents
# subscribers (routers) are few, Generate calls are bounded by max_num_seqs plus a queue.
MIN_HANDLER_THREADS = 32


class WorkerHandle:
    """A running worker. `address` is "host:port" with the port actually bound."""

    def __init__(self, server: Any, loop: EngineLoop, health_servicer: Any,
                 host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server = server
        self._loop = loop
        self._health = health_servicer
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def epoch(self) -> int:
        return self._loop.epoch

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving: health goes NOT_SERVING, streams in flight end (requests aborted,
        their pages freed), the engine thread exits. Idempotent."""
        if self._stopped.is_set():
            return
        self._health.enter_graceful_shutdown()
        self._loop.stop()
        self._server.stop(grace).wait()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() completed; True if it did within `timeout`."""
        return self._stopped.wait(timeout)


def serve_worker(
    config: WorkerConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    load_timeout: float | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    engine_factory: Callable[[], Any] | None = None,
) -> WorkerHandle:
    """Start a worker and block until its model is loaded. Port 0 picks a free port.

    `token` requires `authorization: Bearer <token>` on every call but health; `tls_cert` and
    `tls_key` (PEM paths, both or neither) serve TLS. `engine_factory` defaults to
    `workers.engine.Engine(config)`. Raises WorkerNotReady (after stopping the server) when the
    model fails to load."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if engine_factory is None:
        from kvmesh.workers.engine.engine import (
            Engine,  # heavy (torch, transformers): only when serving
        )

        engine_factory = lambda: Engine(config)  # noqa: E731
    num_threads = max(MIN_HANDLER_THREADS, 2 * config.max_num_seqs + 8)
    servicer: WorkerServicer
    if config.grpc_server == "aio":
        server: Any = AioServer(num_threads, token)
        loop = EngineLoop(engine_factory, on_streams_ready=wake_streams(server.event_loop))
        servicer = AioWorkerServicer(loop, config.max_num_seqs, server.executor,
                                     role=config.role, token=token)
    else:
        loop = EngineLoop(engine_factory)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=num_threads,
                                       thread_name_prefix="kvmesh-worker"),
            options=GRPC_OPTIONS,
            interceptors=[BearerAuth.internal(token)] if token else [],
        )
        servicer = WorkerServicer(loop, max_num_seqs=config.max_num_seqs, role=config.role,
                                  token=token)
    grpc_server = server.server if isinstance(server, AioServer) else server
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, grpc_server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        grpc_server,
    )
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if tls_cert is not None and tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())]
        )
        bound_port = grpc_server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound_port = grpc_server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    loop.start()
    handle = WorkerHandle(server, loop, health_servicer, host, bound_port)
    try:
        loop.wait_ready(load_timeout)
    except Exception:
        handle.stop(grace=0)
        raise
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("worker serving %s on %s", config.model, handle.address)
    return handle
