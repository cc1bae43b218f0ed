"""A grpc.aio server on an event-loop thread of its own, driven from sync code (`serve_worker`,
`WorkerHandle.stop`) like a sync `grpc.Server`.

Sync handlers (everything but `AioWorkerServicer.Generate`, health, auth's denials) run on the
migration thread pool; coroutine handlers run on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent import futures
from typing import Any

import grpc

from kvmesh.cachestore.rpc.auth import AioBearerAuth, BearerAuth
from kvmesh.cachestore.rpc.wire import GRPC_OPTIONS


class AioServer:
    """`server` is the grpc.aio.Server: register services on it, bind its ports, then start().
    `executor` is its migration thread pool (sync handlers; blocking work of coroutines)."""

    def __init__(self, num_threads: int, token: str | None) -> None:
        self.event_loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.event_loop.run_forever,
                                        name="kvmesh-worker-aio", daemon=True)
        self._thread.start()
        self.executor = futures.ThreadPoolExecutor(max_workers=num_threads,
                                                thread_name_prefix="kvmesh-worker")
        interceptors = [AioBearerAuth(BearerAuth.internal(token))] if token else []
        self.server: grpc.aio.Server = self._run(self._create(interceptors))

    async def _create(self, interceptors: list[Any]) -> grpc.aio.Server:
        # built on the event loop: a grpc.aio server binds to the loop it is created on
        return grpc.aio.server(migration_thread_pool=self.executor, options=GRPC_OPTIONS,
                               interceptors=interceptors)

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.event_loop).result()

    def start(self) -> None:
        self._run(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving (calls in flight get `grace` seconds), then the event loop; the returned
        event is set (as `grpc.Server.stop(grace).wait()` expects)."""
        if not self.event_loop.is_closed():
            self._run(self.server.stop(grace))
            self.event_loop.call_soon_threadsafe(self.event_loop.stop)
            self._thread.join()
            self.event_loop.close()
            self.executor.shutdown(wait=False)
        done = threading.Event()
        done.set()
        return done
