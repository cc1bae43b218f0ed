"""Bulk streams (Put, PutPages, GetClosest, GetPages) under a limit and an idle watchdog.

A gRPC sync server runs each call on a thread of one pool, and a streaming call keeps its thread
for as long as the client keeps the stream open: 32 Put streams opened and left idle took every
thread, and a Lookup then waited past its deadline. So:

- at most `max_streams` bulk streams run at once; one more is refused at once with
  RESOURCE_EXHAUSTED (StreamsExhausted), so the rest of the pool stays free for unary control
  calls (Lookup, HasPages, Stats, ...);
- a bulk stream that waits on its client for `idle_s` (no request message arrives, or a reply
  frame cannot be sent because the client reads nothing) is cancelled with DEADLINE_EXCEEDED.
  Time the server itself spends (reading tiers, checking pages) does not count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from kvmesh.cachestore.errors import StreamIdle, StreamsExhausted

log = logging.getLogger(__name__)


class BulkStreams:
    """Thread-safe. Owns one watchdog thread (stopped by `close`)."""

    def __init__(self, max_streams: int, idle_s: float) -> None:
        assert max_streams > 0 and idle_s > 0
        self.max_streams, self.idle_s = max_streams, idle_s
        self._lock = threading.Lock()
        self._running: set[Stream] = set()
        self.num_refused = self.num_cancelled = 0
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="kvstore-streams",
                                          daemon=True)
        self._watchdog.start()

    def admit(self, context: grpc.ServicerContext) -> Stream:
        """A slot for one bulk stream, held until `Stream.release` (also run when the call
        ends). Raises StreamsExhausted when all are taken."""
        stream = Stream(self, context)
        with self._lock:
            if len(self._running) >= self.max_streams:
                self.num_refused += 1
                raise StreamsExhausted(f"{self.max_streams} bulk streams are running; try again")
            self._running.add(stream)
        context.add_callback(stream.release)
        return stream

    @property
    def num_running(self) -> int:
        with self._lock:
            return len(self._running)

    def close(self) -> None:
        self._stop.set()
        self._watchdog.join()

    def count_cancelled(self) -> None:
        with self._lock:
            self.num_cancelled += 1

    def _release(self, stream: Stream) -> None:
        with self._lock:
            self._running.discard(stream)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.idle_s / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._running if s.is_idle_since(now - self.idle_s)]
            for stream in idle:
                stream.cancel(f"no progress from the client for {self.idle_s:g} s")


class Stream:
    """One admitted bulk stream. `requests` / `replies` wrap its message iterators and clock
    the time spent waiting on the client."""

    def __init__(self, streams: BulkStreams, context: grpc.ServicerContext) -> None:
        self._streams, self._context = streams, context
        self._waiting_since: float | None = None
        self.is_cancelled = False

    def requests(self, items: Iterator) -> Iterator:
        """The client's request messages; raises StreamIdle once the watchdog cancelled."""
        while True:
            self._waiting_since = time.monotonic()
            try:
                item = next(items)
            except StopIteration:
                self._raise_if_cancelled()
                return
            except grpc.RpcError:
                self._raise_if_cancelled()
                raise
            finally:
                self._waiting_since = None
            yield item

    def replies(self, items: Iterator) -> Iterator:
        """The reply messages; the slot is released once they are sent (or the call ends)."""
        try:
            for item in items:
                self._waiting_since = time.monotonic()
                yield item  # grpc sends it, and asks for the next one once the client has room
                self._waiting_since = None
        finally:
            self.release()

    def is_idle_since(self, since: float) -> bool:
        waiting_since = self._waiting_since
        return not self.is_cancelled and waiting_since is not None and waiting_since < since

    def cancel(self, reason: str) -> None:
        """End the call; its slot goes when its thread has left (the call's end callback)."""
        self.is_cancelled = True
        self._streams.count_cancelled()
        _cancel_with_status(self._context, grpc.StatusCode.DEADLINE_EXCEEDED, reason)

    def release(self) -> None:
        self._streams._release(self)

    def _raise_if_cancelled(self) -> None:
        if self.is_cancelled:
            raise StreamIdle("the stream was cancelled: the client sent nothing for "
                             f"{self._streams.idle_s:g} s")


def _cancel_with_status(context: Any, code: grpc.StatusCode, details: str) -> None:
    """End the call now, from any thread, telling the client `code` and `details`. The public
    ServicerContext.cancel() only says CANCELLED, which reads as the client's own doing, so
    grpc's core call is asked directly when this grpc version exposes it."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        from grpc._cython import cygrpc

        status = getattr(cygrpc.StatusCode, code.name.lower())
        call.cancel(status, details)  # type: ignore[union-attr]
        return
    except Exception:  # another grpc: the public cancel
        log.debug("cancel with status failed; cancelling plainly", exc_info=True)
    context.cancel()
