"""The engine loop: one thread owns the Engine; gRPC handler threads talk to it through queues.

The Engine is single-threaded. Handler threads never touch it: they put commands on one
thread-safe queue (add, abort, subscribe, unsubscribe) and read results from their own queues
(`RequestStream` per Generate call, `EventSubscription` per KvEvents call). Everything the engine
emits (outputs, KV events) is dispatched by the loop thread, so a subscription's snapshot and its
live events are ordered without locks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kvmesh.workers.errors import (
    BatchFailed,
    EngineError,
    EngineFailure,
    RequestFailed,
    SubscriberTooSlow,
    WorkerNotReady,
)
from kvmesh.workers.service.streams import EventSubscription, RequestStream

log = logging.getLogger(__name__)


@dataclass
class _Active:
    stream: RequestStream
    num_completions: int
    finished_indices: set[int] = field(default_factory=set)


class EngineLoop:
    """Owns an Engine on a dedicated thread.

    `engine_factory` runs on the loop thread (so a CUDA context belongs to it). `epoch` identifies
    this process's event history: it differs on every start, so a subscriber seeing a new epoch
    knows the worker restarted."""

    def __init__(self, engine_factory: Callable[[], Any],
                 on_streams_ready: Callable[[list[RequestStream]], None] | None = None) -> None:
        self.epoch = time.time_ns()
        self._engine_factory = engine_factory
        # Called on the loop thread once per loop iteration with the streams that got outputs
        # or their end (the grpc.aio server hands them to its event loop in one call); None:
        # handler threads block on the streams' queues instead.
        self._on_streams_ready = on_streams_ready
        self._ready_streams: list[RequestStream] = []
        self._engine: Any = None
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._active: dict[str, _Active] = {}
        self._subscriptions: list[EventSubscription] = []
        self._latest_subscription: EventSubscription | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._is_stopping = False
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kvmesh-engine-loop", daemon=True)

    # ---- called from any thread ----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> Any:
        """Block until the engine is loaded; returns it (read-only use: tokenizer, limits).
        Raises WorkerNotReady if loading failed or timed out."""
        if not self._ready.wait(timeout):
            raise WorkerNotReady("the worker is still loading its model"
                                 + (f" after {timeout} s" if timeout else ""))
        if self._load_error is not None:
            raise WorkerNotReady(f"engine failed to load: {self._load_error}") from self._load_error
        return self._engine

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None

    def submit(
        self, request_id: str, prompt_token_ids: list[int], sampling: Any, tenant_salt: str
    ) -> RequestStream:
        """Queue a request; outputs arrive on the returned stream. The engine's request id is
        made unique per call so two clients reusing an id never collide."""
        if not self.is_ready or self._is_stopping:
            raise WorkerNotReady("worker is not serving (loading or shutting down)")
        with self._id_lock:
            self._next_id += 1
            engine_request_id = f"{request_id}#{self._next_id}"
        stream = RequestStream(self, engine_request_id)
        num_completions = max(1, int(getattr(sampling, "n", 1) or 1))
        self._commands.put(
            ("add", stream, num_completions, prompt_token_ids, sampling, tenant_salt)
        )
        return stream

    def abort(self, engine_request_id: str) -> None:
        self._commands.put(("abort", engine_request_id))

    def call(self, fn: Callable[[Any], Any], timeout: float) -> Any:
        """Run `fn(engine)` on the loop thread between steps; its result, or its exception.
        TimeoutError after `timeout` seconds (it may still run later)."""
        if not self.is_ready or self._is_stopping:
            raise WorkerNotReady("worker is not serving (loading or shutting down)")
        future: Future[Any] = Future()
        self._commands.put(("call", fn, future))
        return future.result(timeout)

    def subscribe(self) -> EventSubscription:
        if not self.is_ready or self._is_stopping:
            raise WorkerNotReady("worker is not serving (loading or shutting down)")
        subscription = EventSubscription(self)
        self._commands.put(("subscribe", subscription))
        return subscription

    def unsubscribe(self, subscription: EventSubscription) -> None:
        self._commands.put(("unsubscribe", subscription))

    # Refreshed by the loop thread before each step's outputs are dispatched and after each batch
    # of commands, so Stats never waits for a (possibly long) step.
    engine_stats: Any = None  # workers.outputs.EngineStats
    base_namespace: Any = None  # the engine's Namespace with an empty salt

    @property
    def kv_events_seq(self) -> int:
        """Last sequence number emitted on the newest subscription (0 before the first). A
        router holds one subscription, so it compares this with the last seq it applied."""
        latest = self._latest_subscription
        return latest.last_seq if latest is not None else 0

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything in flight, end every stream, and join the loop thread."""
        self._is_stopping = True
        self._commands.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._engine = self._engine_factory()
        except BaseException as exc:  # noqa: BLE001 - reported through wait_ready
            if isinstance(exc, EngineError):  # bad model path or config: a message suffices
                log.error("engine failed to load: %s", exc)
            else:
                log.exception("engine failed to load")
            self._load_error = exc
            self._ready.set()
            return
        self.base_namespace = self._engine.namespace("")
        self._refresh_stats()
        self._ready.set()
        while True:
            is_idle = not self._engine.has_unfinished_requests()
            if not self._handle_commands(block=is_idle):
                break
            self._refresh_stats()
            if self._engine.has_unfinished_requests():
                self._step()
            self._publish_events()
            self._hand_off_ready_streams()
        self._shutdown()
        self._hand_off_ready_streams()

    def _put_output(self, stream: RequestStream, output: Any) -> None:
        stream._put(output)
        if self._on_streams_ready is not None:
            self._ready_streams.append(stream)

    def _end_stream(self, stream: RequestStream, error: BaseException | None = None) -> None:
        stream._finish(error)
        if self._on_streams_ready is not None:
            self._ready_streams.append(stream)

    def _hand_off_ready_streams(self) -> None:
        if self._ready_streams and self._on_streams_ready is not None:
            ready, self._ready_streams = self._ready_streams, []
            self._on_streams_ready(ready)

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            _, stream, num_completions, prompt_token_ids, sampling, tenant_salt = command
            try:
                self._engine.add_request(
                    stream.engine_request_id, prompt_token_ids, sampling, tenant_salt=tenant_salt
                )
            except Exception as exc:  # noqa: BLE001 - typed errors go back to the caller
                self._end_stream(stream, exc)
                return
            self._active[stream.engine_request_id] = _Active(stream, num_completions)
        elif kind == "abort":
            active = self._active.pop(command[1], None)
            if active is not None:
                self._engine.abort_request(command[1])
                self._end_stream(active.stream)
        elif kind == "call":
            _, fn, future = command
            try:
                future.set_result(fn(self._engine))
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                future.set_exception(exc)
        elif kind == "subscribe":
            self._publish_events()  # older subscribers get pending events before the snapshot
            subscription: EventSubscription = command[1]
            self._subscriptions.append(subscription)
            self._latest_subscription = subscription
            subscription._emit(None)
            for event in self._engine.cached_pages():
                subscription._emit(event)
        elif kind == "unsubscribe":
            if command[1] in self._subscriptions:
                self._subscriptions.remove(command[1])
                command[1]._end()

    def _refresh_stats(self) -> None:
        self.engine_stats = self._engine.stats()  # replaced whole: readers never see it torn

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
            self._refresh_stats()  # before the outputs go out: a caller reacting sees the step
        except BatchFailed as exc:  # the engine aborted the batch; the others go on
            self._refresh_stats()
            for request_id in exc.request_ids:
                active = self._active.pop(request_id, None)
                if active is not None:
                    self._end_stream(active.stream, EngineFailure(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - fail everything in flight, keep the worker up
            log.exception("engine step failed; aborting %d requests", len(self._active))
            for request_id, active in list(self._active.items()):
                try:
                    self._engine.abort_request(request_id)
                except Exception:  # noqa: BLE001
                    log.exception("abort after failed step")
                self._end_stream(active.stream, EngineFailure(f"engine step failed: {exc}"))
            self._active.clear()
            return
        for output in outputs:
            owner = self._active.get(output.request_id)
            if owner is None:
                continue  # aborted by the caller already
            if output.error is not None:  # quarantined: this request alone failed
                del self._active[output.request_id]
                self._end_stream(owner.stream, RequestFailed(output.error))
                continue
            self._put_output(owner.stream, output)
            if output.finish_reason is not None:
                owner.finished_indices.add(output.index)
                if len(owner.finished_indices) >= owner.num_completions:
                    del self._active[output.request_id]
                    self._end_stream(owner.stream)

    def _publish_events(self) -> None:
        events = self._engine.pop_kv_events()
        if not events or not self._subscriptions:
            return
        for subscription in list(self._subscriptions):
            for event in events:
                # A "cleared" event becomes AllCleared{epoch}: the subscriber drops everything.
                if not subscription._emit(None if event.kind == "cleared" else event):
                    self._subscriptions.remove(subscription)
                    subscription._end(SubscriberTooSlow("subscriber fell behind; resubscribe"))
                    break

    def _shutdown(self) -> None:
        for request_id, active in list(self._active.items()):
            try:
                self._engine.abort_request(request_id)
            except Exception:  # noqa: BLE001
                log.exception("abort at shutdown")
            self._end_stream(active.stream, WorkerNotReady("worker is shutting down"))
        self._active.clear()
        for subscription in self._subscriptions:
            subscription._end()
        self._subscriptions.clear()
        while True:  # fail whatever arrived after the stop command
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._end_stream(command[1], WorkerNotReady("worker is shutting down"))
            elif command[0] == "call":
                command[2].set_exception(WorkerNotReady("worker is shutting down"))
            elif command[0] in ("subscribe", "unsubscribe"):
                command[1]._end()
        try:
            self._engine.close()  # joins the offload's store writer
        except Exception:  # noqa: BLE001
            log.exception("engine close failed")
