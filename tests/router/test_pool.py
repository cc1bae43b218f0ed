"""WorkerPool: circuit breaking, dead workers taken out with their index entries, degrading to
slow workers instead of failing. Real gRPC channels; the "dead" worker is a closed port."""

from __future__ import annotations

import asyncio
import socket

import grpc

from kvmesh.cachestore.keys import Namespace
from kvmesh.router.config import RouterConfig
from kvmesh.router.index import TIER_DEVICE, Cleared, PrefixIndex, PrefixMatch, Stored
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.pool import WorkerPool

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
