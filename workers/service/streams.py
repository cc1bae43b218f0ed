"""What gRPC handler threads hold while the engine loop works: a request's output stream and a KV
event subscription.

Both are fed only by the engine-loop thread (`engine_loop.py`) and read by one handler thread
each (or by one coroutine, `RequestStream.abatches`, under the grpc.aio server); their queues
are the only shared state. The loop hands typed errors (`workers/errors.py`)
back through them. This module does not import the loop: a handler reaches it only through
`LoopCommands`, which `EngineLoop` implements.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

_END = object()  # end of a request's or subscription's queue
# A subscriber this far behind is dropped; it resubscribes and resyncs from a snapshot.
MAX_PENDING_EVENTS = 100_000


class LoopCommands(Protocol):
    """The commands a handler thread sends to the engine loop; both only queue the command."""

    def abort(self, engine_request_id: str) -> None: ...

    def unsubscribe(self, subscription: EventSubscription) -> None: ...

@dataclass(frozen=True)
class SequencedEvent:
    """One KvEvents message of a subscription: `event` is a KvEventData, or None for the
    AllCleared{epoch} that opens every subscription (and follows an engine "cleared" event)."""

    seq: int
    event: Any  # workers.engine.KvEventData | None


class RequestStream:
    """Outputs of one Generate call, in order; iterate to receive RequestOutput objects.

    Iteration ends once all `n` completions finished; it raises the typed error the loop put
    (InvalidRequest, EngineFailure, WorkerNotReady). `cancel()` aborts the request in the engine
    (idempotent; a no-op once finished)."""

    def __init__(self, loop: LoopCommands, engine_request_id: str) -> None:
        self.engine_request_id = engine_request_id
        self._loop = loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._is_done = threading.Event()
        self.waker: Callable[[], None] | None = None  # set by abatches(), on its event loop

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def batches(self) -> Iterator[list[Any]]:
        """The same outputs, in order, as lists: each wake-up takes all that is queued. A
        handler behind the engine (a slow reader, a busy process) sends fewer, larger messages
        instead of falling further behind; one that keeps up gets one output at a time."""
        while True:
            batch, item = self._drain(self._queue.get())
            if batch:
                yield batch
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item

    async def abatches(self) -> AsyncIterator[list[Any]]:
        """`batches()` for a coroutine on an asyncio loop: waits without a thread. The loop
        thread's `on_streams_ready` hook must call `wake()` on this event loop (`EngineLoop`)."""
        event = asyncio.Event()
        self.waker = event.set
        while True:
            event.clear()  # set only on this event loop: nothing is missed before the wait
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                await event.wait()
                continue
            batch, item = self._drain(first)
            if batch:
                yield batch
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item

    def wake(self) -> None:
        """Wake an `abatches()` reader; call it on the reader's event loop."""
        if self.waker is not None:
            self.waker()

    def _drain(self, item: Any) -> tuple[list[Any], Any]:
        """`item` and the outputs queued after it, up to an end or error: (outputs, the end or
        error that stopped them, or None)."""
        batch = []
        while item is not _END and not isinstance(item, BaseException):
            batch.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, None
        return batch, item

    def cancel(self) -> None:
        if not self._is_done.is_set():
            self._loop.abort(self.engine_request_id)

    def _put(self, item: Any) -> None:
        self._queue.put(item)

    def _finish(self, error: BaseException | None = None) -> None:
        if self._is_done.is_set():
            return
        self._is_done.set()
        if error is not None:
            self._queue.put(error)
        self._queue.put(_END)


def coalesce(outputs: list[Any]) -> list[Any]:
    """One RequestOutput per completion index, in order of first appearance: the new tokens
    and text of all its outputs joined, with the finish reason and usage of its last (only a
    completion's final output carries them)."""
    if len(outputs) == 1:
        return outputs
    merged: dict[int, Any] = {}
    for output in outputs:
        earlier = merged.get(output.index)
        merged[output.index] = output if earlier is None else dataclasses.replace(
            output, new_token_ids=earlier.new_token_ids + output.new_token_ids,
            text_delta=earlier.text_delta + output.text_delta)
    return list(merged.values())


class EventSubscription:
    """KV events for one KvEvents call: AllCleared, the snapshot, then live events.

    Sequence numbers start at 1 and increase by one per message. `close()` unsubscribes."""

    def __init__(self, loop: LoopCommands) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._num_pending = 0  # approximate; only the loop thread increments it
        self.last_seq = 0
        self._end_item: Any = None  # the end or error next_batch() met after a batch

    def __iter__(self) -> Iterator[SequencedEvent]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            self._num_pending -= 1
            yield item

    def next_batch(self) -> list[SequencedEvent]:
        """Block for the next event, then take all queued after it; [] once the subscription
        ended. Raises the error that ended it (once its events before it were taken)."""
        if self._end_item is not None:
            item, self._end_item = self._end_item, _END
        else:
            item = self._queue.get()
        batch: list[SequencedEvent] = []
        while item is not _END and not isinstance(item, BaseException):
            self._num_pending -= 1
            batch.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch
        if batch:
            self._end_item = item  # returned (or raised) by the next call
            return batch
        self._end_item = _END
        if isinstance(item, BaseException):
            raise item
        return batch

    def close(self) -> None:
        self._loop.unsubscribe(self)

    def _emit(self, event: Any) -> bool:
        """Queue one event; False when the subscriber is too far behind (caller drops it)."""
        if self._num_pending >= MAX_PENDING_EVENTS:
            return False
        self.last_seq += 1
        self._num_pending += 1
        self._queue.put(SequencedEvent(self.last_seq, event))
        return True

    def _end(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._queue.put(error)
        self._queue.put(_END)
