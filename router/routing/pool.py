"""Worker pool: one gRPC channel per worker, health polling (Stats), circuit breaking, and the
KvEvents subscription that feeds the prefix index. Runs on the router's asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

import grpc

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc.wire import namespace_from_spec
from kvmesh.router.config import RouterConfig
from kvmesh.router.errors import SequenceGap
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.routing.index import Cleared, PrefixIndex, Removed, Stored
from kvmesh.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_NBYTES = 64 << 20
STATS_TIMEOUT_S = 5.0  # a busy CPU worker answers Stats slowly; that is not death
RESUBSCRIBE_BACKOFF_S = (0.05, 0.2, 0.5, 1.0)
INITIAL_RECONNECT_MS = 100
# Worker failures that make a request worth retrying elsewhere (the worker, not the input, failed).
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
})
# Trailing metadata a worker sets when a request failed alone inside its engine (worker.proto,
# Generate): the input is to blame, so no retry elsewhere and no strike against the worker.
FAILURE_SCOPE_KEY = "kvmesh-failure-scope"


def is_request_failure(error: grpc.aio.AioRpcError) -> bool:
    """True when the worker says the request itself failed, not the worker."""
    trailing = error.trailing_metadata() or ()
    return any(key == FAILURE_SCOPE_KEY and value == "request" for key, value in trailing)


# which workers take which part of a request (RouterConfig.roles)
ROLES_FOR = {"decode": ("both", "decode"), "prefill": ("prefill",)}


class WorkerHandle:
    """One worker as the router sees it. `num_inflight` / `num_queued_tokens` are the router's
    own up-to-date counts of what it sent; `stats` is the worker's last report. `role`: "both",
    "prefill" or "decode", as the router was told (RouterConfig.roles)."""

    def __init__(self, address: str, token: str, max_reconnect_s: float = 1.0,
                 role: str = "both") -> None:
        self.worker_id = address
        self.role = role
        # gRPC's reconnect backoff grows to 2 min by default: a worker back from a crash would
        # wait that long for the channel to try again. Capped, it is seen on the next probe.
        max_reconnect_ms = max(int(max_reconnect_s * 1000), INITIAL_RECONNECT_MS)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_NBYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_NBYTES),
                   ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_MS),
                   ("grpc.max_reconnect_backoff_ms", max_reconnect_ms)]
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stats: worker_pb2.WorkerStats | None = None
        self.namespace: Namespace | None = None  # the worker's namespace, empty salt
        self.is_healthy = False
        self.is_gone = False  # refused connections (not just slow answers)
        self.num_failures = 0  # consecutive request failures
        self.circuit_open_until = 0.0
        self.num_inflight = 0
        self.num_queued_tokens = 0
        self.num_cached_pages = 0  # pages the index holds for it
        self.num_stats_failures = 0  # consecutive
        self.events_call: grpc.aio.UnaryStreamCall | None = None
        self.resync_requested = False

    def is_available(self, now: float) -> bool:
        return self.is_healthy and self.namespace is not None and now >= self.circuit_open_until


class WorkerPool:
    def __init__(self, config: RouterConfig, index: PrefixIndex, metrics: RouterMetrics) -> None:
        self.config = config
        self.index = index
        self.metrics = metrics
        self.workers = {addr: WorkerHandle(addr, config.worker_token, config.health_interval_s,
                                           role)
                        for addr, role in config.roles.items()}
        self._tasks: list[asyncio.Task] = []
        self._ready = asyncio.Event()

    async def start(self) -> None:
        for handle in self.workers.values():
            self.index.add_worker(handle.worker_id)
            self._tasks.append(asyncio.create_task(self._poll_stats(handle)))
            self._tasks.append(asyncio.create_task(self._follow_events(handle)))

    async def wait_ready(self, timeout: float) -> bool:
        """True once any worker answered Stats (within `timeout` seconds)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._ready.is_set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self.workers.values():
            await handle.channel.close()

    def available(self, part: str = "decode") -> list[WorkerHandle]:
        """Healthy workers with a closed circuit that take `part` of a request: "decode" (whole
        requests, or the rest after a prefill worker's first token) or "prefill". If there are
        none, degrade instead of failing: workers that only answered health checks slowly (an
        overloaded CPU) still count."""
        now = time.monotonic()
        roles = ROLES_FOR[part]
        candidates = [h for h in self.workers.values() if h.role in roles]
        ready = [h for h in candidates if h.is_available(now)]
        if ready:
            return ready
        return [h for h in candidates if h.namespace is not None and not h.is_gone
                and now >= h.circuit_open_until]

    # ---- request outcomes ----------------------------------------------------------------
    def record_success(self, handle: WorkerHandle) -> None:
        handle.num_failures = 0
        handle.circuit_open_until = 0.0

    def record_failure(self, handle: WorkerHandle, code: grpc.StatusCode | None) -> None:
        """A request failed on the worker. UNAVAILABLE means it is gone: take it out and drop
        its index entries now; otherwise open its circuit after `circuit_failures` in a row."""
        handle.num_failures += 1
        if code == grpc.StatusCode.UNAVAILABLE:
            handle.is_gone = True
            self._mark_down(handle)
        if handle.num_failures >= self.config.circuit_failures:
            handle.circuit_open_until = time.monotonic() + self.config.circuit_cooldown_s

    def _mark_down(self, handle: WorkerHandle) -> None:
        """Take the worker out and drop its index entries now. Its event stream (if still up)
        is cut so the follower resubscribes and rebuilds from a fresh snapshot."""
        handle.is_healthy = False
        self.index.drop_worker(handle.worker_id)
        handle.num_cached_pages = 0
        self.metrics.worker_down(handle.worker_id)
        if handle.events_call is not None and not handle.events_call.done():
            handle.resync_requested = True
            handle.events_call.cancel()

    def generate(self, handle: WorkerHandle, request: worker_pb2.GenerateRequest
                 ) -> grpc.aio.UnaryStreamCall:
        """Start the worker's Generate call; iterate it for GenerateResponses. The caller owns
        it: `cancel()` when it stops reading early, and the worker aborts the request (its
        pages are freed) rather than generating for nobody."""
        return handle.stub.Generate(request, metadata=handle.metadata)

    # ---- background loops ----------------------------------------------------------------
    async def _poll_stats(self, handle: WorkerHandle) -> None:
        while True:
            try:
                stats = await handle.stub.Stats(worker_pb2.WorkerStatsRequest(),
                                                metadata=handle.metadata, timeout=STATS_TIMEOUT_S)
                self._apply_stats(handle, stats)
            except grpc.aio.AioRpcError as exc:
                # Refused connection = gone: out now. Slow answers: out after a few in a row.
                handle.num_stats_failures += 1
                is_gone = exc.code() == grpc.StatusCode.UNAVAILABLE
                handle.is_gone = handle.is_gone or is_gone
                if handle.is_healthy and (
                    is_gone or handle.num_stats_failures >= self.config.circuit_failures
                ):
                    log.warning("worker %s failed its health check: %s", handle.worker_id,
                                exc.code().name)
                    self._mark_down(handle)
            await asyncio.sleep(self.config.health_interval_s)

    def _apply_stats(self, handle: WorkerHandle, stats: worker_pb2.WorkerStats) -> None:
        handle.stats = stats
        handle.num_stats_failures = 0
        handle.is_gone = False
        if handle.namespace is None and stats.HasField("namespace"):
            handle.namespace = namespace_from_spec(stats.namespace)
        was_healthy, handle.is_healthy = handle.is_healthy, True
        if not was_healthy:  # back (or restarted): its old request failures say nothing now
            handle.num_failures = 0
            handle.circuit_open_until = 0.0
        w = handle.worker_id
        self.metrics.worker_healthy.set(1, worker=w)
        self.metrics.requests_running.set(stats.num_running, worker=w)
        self.metrics.requests_waiting.set(stats.num_waiting, worker=w)
        if stats.num_pages_total:
            used = 1 - stats.num_pages_free / stats.num_pages_total
            self.metrics.kv_usage.set(round(used, 6), worker=w)
        if self.index.is_synced(w):
            lag = max(stats.kv_events_seq - self.index.applied_seq(w), 0)
            self.metrics.index_lag.set(lag, worker=w)
        if not was_healthy:
            log.info("worker %s is up (%s)", w, stats.model)
            if stats.role and stats.role != handle.role:
                log.warning("worker %s runs as %s but the router was told %s; it gets %s work",
                            w, stats.role, handle.role, handle.role)
        if handle.namespace is not None:
            self._ready.set()

    async def _follow_events(self, handle: WorkerHandle) -> None:
        """Keep the index in step with the worker: every (re)subscription starts with
        AllCleared + a snapshot; a gap resubscribes; a broken stream drops the worker's entries."""
        attempt = 0
        while True:
            call = handle.stub.KvEvents(worker_pb2.KvEventsRequest(), metadata=handle.metadata)
            handle.events_call = call
            try:
                async for event in call:
                    attempt = 0
                    self._apply_event(handle.worker_id, event)
                self.index.drop_worker(handle.worker_id)  # stream ended: worker shutting down
            except SequenceGap as exc:
                log.warning("%s; resyncing", exc)
                self.metrics.index_resyncs.inc(worker=handle.worker_id)
                continue
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                if not handle.resync_requested:
                    if isinstance(sys.exc_info()[1], asyncio.CancelledError):
                        raise  # the pool is closing
                    self.index.drop_worker(handle.worker_id)
                else:  # cut by _mark_down: resubscribe at once
                    handle.resync_requested = False
                    self.metrics.index_resyncs.inc(worker=handle.worker_id)
                    continue
            finally:
                call.cancel()
                handle.events_call = None
            await asyncio.sleep(RESUBSCRIBE_BACKOFF_S[min(attempt, len(RESUBSCRIBE_BACKOFF_S) - 1)])
            attempt += 1

    def _apply_event(self, worker_id: str, event: worker_pb2.KvEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "stored":
            self.index.apply(worker_id, event.seq, Stored(event.stored.keys, event.stored.tier))
        elif kind == "removed":
            self.index.apply(worker_id, event.seq,
                             Removed(event.removed.keys, event.removed.tier))
        elif kind == "cleared":
            self.index.apply(worker_id, event.seq, Cleared(event.cleared.epoch))
        self.metrics.index_pages.set(self.index.num_pages())
        self.workers[worker_id].num_cached_pages = self.index.num_pages(worker_id)
