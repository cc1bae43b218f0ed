"""WorkerPool: circuit breaking, dead workers taken out with their index entries, degrading to
slow workers instead of failing. Real gRPC channels; the "dead" worker is a closed port."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc.wire import namespace_to_spec
from kvmesh.router.config import RouterConfig
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.routing.index import TIER_DEVICE, Cleared, PrefixIndex, PrefixMatch, Stored
from kvmesh.router.routing.pool import WorkerPool
from kvmesh.v1 import worker_pb2, worker_pb2_grpc

NS = Namespace(model="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", page_size=4)
KEYS = NS.page_keys(list(range(16)))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block exits


def make_pool(**overrides) -> WorkerPool:
    config = RouterConfig(workers=(f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"),
                          **overrides)
    index = PrefixIndex()
    pool = WorkerPool(config, index, RouterMetrics())
    for handle in pool.workers.values():
        index.add_worker(handle.worker_id)
        index.apply(handle.worker_id, 1, Cleared(epoch=1))
        handle.is_healthy, handle.namespace = True, NS  # as after a good Stats answer
    return pool


def test_circuit_opens_after_consecutive_failures_and_half_opens_after_cooldown():
    async def body():
        pool = make_pool(circuit_failures=2, circuit_cooldown_s=0.3)
        a, b = pool.workers.values()
        assert pool.available() == [a, b]
        pool.record_failure(a, grpc.StatusCode.INTERNAL)
        assert pool.available() == [a, b]
        pool.record_success(a)  # a success resets the count
        pool.record_failure(a, grpc.StatusCode.INTERNAL)
        assert pool.available() == [a, b]
        pool.record_failure(a, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert pool.available() == [b]
        await asyncio.sleep(0.35)
        assert pool.available() == [a, b]
        await pool.close()

    asyncio.run(body())


def test_unavailable_worker_is_out_at_once_with_its_index_entries():
    async def body():
        pool = make_pool()
        a, b = pool.workers.values()
        pool.index.apply(a.worker_id, 2, Stored(KEYS, TIER_DEVICE))
        pool.index.apply(b.worker_id, 2, Stored(KEYS[:2], TIER_DEVICE))
        pool.record_failure(a, grpc.StatusCode.UNAVAILABLE)
        assert pool.available() == [b]
        assert pool.index.match(KEYS) == {b.worker_id: PrefixMatch(2, 2)}
        # every worker merely slow (not refusing): degrade to them instead of failing
        b.is_healthy = False
        assert pool.available() == [b]
        b.is_gone = True
        assert pool.available() == []
        await pool.close()

    asyncio.run(body())


def test_health_polling_marks_a_closed_port_gone():
    async def body():
        config = RouterConfig(workers=(f"127.0.0.1:{closed_port()}",), health_interval_s=0.05)
        pool = WorkerPool(config, PrefixIndex(), RouterMetrics())
        await pool.start()
        assert not await pool.wait_ready(0.5)
        (handle,) = pool.workers.values()
        assert handle.is_gone and not handle.is_healthy and pool.available() == []
        assert pool.metrics.worker_healthy.get(worker=handle.worker_id) == 0
        await pool.close()

    asyncio.run(body())


class StatsOnlyWorker(worker_pb2_grpc.WorkerServicer):
    """Answers health checks and holds an idle KvEvents stream; no generation."""

    async def KvEvents(self, request, context):
        yield worker_pb2.KvEvent(seq=1, cleared=worker_pb2.AllCleared(epoch=1))
        await asyncio.Event().wait()

    async def Stats(self, request, context):
        return worker_pb2.WorkerStats(model="m", page_size=4, num_pages_total=8, num_pages_free=8,
                                      max_model_len=64, namespace=namespace_to_spec(NS))


async def start_stats_server(port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(StatsOnlyWorker(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


def test_worker_back_on_its_address_is_available_on_the_next_health_checks():
    """Down long enough for gRPC's default reconnect backoff to reach seconds, its circuit open
    with a cooldown far longer than the test: the first good Stats answer re-admits it."""
    async def body():
        server, port = await start_stats_server()
        config = RouterConfig(workers=(f"127.0.0.1:{port}",), health_interval_s=0.1,
                              circuit_failures=2, circuit_cooldown_s=600)
        pool = WorkerPool(config, PrefixIndex(), RouterMetrics())
        await pool.start()
        assert await pool.wait_ready(5)
        (handle,) = pool.workers.values()
        for _ in range(2):  # requests failed on it as it died: its circuit opens
            pool.record_failure(handle, grpc.StatusCode.UNAVAILABLE)
        await server.stop(None)
        while not handle.is_gone:
            await asyncio.sleep(0.02)
        assert pool.available() == []
        await asyncio.sleep(6)  # gRPC's own backoff would be 1, 1.6, 2.6, 4.1 s by now
        server, _ = await start_stats_server(port)
        restarted = time.monotonic()
        while not pool.available():
            assert time.monotonic() - restarted < 1.0, "restarted worker still out after 1 s"
            await asyncio.sleep(0.02)
        assert handle.is_healthy and handle.num_failures == 0
        await pool.close()
        await server.stop(None)

    asyncio.run(body())
