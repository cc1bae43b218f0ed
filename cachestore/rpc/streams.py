"""Bulk streams (Put, PutPages, GetClosest, GetPages) under a limit and an idle watchdog.

A gRPC sync server runs each call on a thread of one pool, and a streaming call keeps its thread
for as long as the client keeps the stream open: 32 Put streams opened and left idle took every
thread, and a Lookup then waited past its deadline. So:

- at most `max_streams` bulk streams run at once; one more is refused at once with
  RESOURCE_EXHAUSTED (StreamsExhausted), so the rest of the pool stays free for unary control
  calls (Lookup, HasPages, Stats, ...);
- a bulk stream that waits on its client for `idle_s` (no request message arrives, or a reply
  frame cannot be sent because the client reads nothing) is cancelled with DEADLINE_EXCEEDED.
  Time the server itself spends (reading tiers, checking pages) does not count;
- the request data of the put streams (Put, PutPages) held at once stays within `receive_nbytes`:
  a put is received whole before anything is stored, so 32 clients each sending a 256 MB put
  would otherwise hold 8 GB. A put stream reserves the bytes its header announces before its
  first data frame is read (and keeps them until the call ends), waiting while other puts hold
  the budget; one put larger than the whole budget runs alone. While it waits, grpc's flow
  control holds its client back; the wait is the server's, not counted as idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from kvmesh.cachestore.errors import StreamIdle, StreamsExhausted
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)

RECEIVE_NBYTES = 128 << 20  # put request data held at once, all streams together


def announced_nbytes(header: Any) -> int:
    """The data bytes a put stream's header announces (0 for any other first message)."""
    if isinstance(header, store_pb2.PutHeader):
        return int(header.payload_nbytes)
    if isinstance(header, store_pb2.PutPagesHeader):
        return sum(header.page_nbytes)
    return 0


class BulkStreams:
    """Thread-safe. Owns one watchdog thread (stopped by `close`)."""

    def __init__(self, max_streams: int, idle_s: float,
                 receive_nbytes: int = RECEIVE_NBYTES) -> None:
        assert max_streams > 0 and idle_s > 0 and receive_nbytes > 0
        self.max_streams, self.idle_s = max_streams, idle_s
        self.receive_nbytes = receive_nbytes
        self._lock = threading.Lock()
        self._has_room = threading.Condition(self._lock)
        self._running: set[Stream] = set()
        self.num_receiving_nbytes = 0  # reserved by put streams now
        self.max_receiving_nbytes = 0  # the most ever reserved at once
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

    def reserve(self, nbytes: int) -> int:
        """Wait until `nbytes` of request data fit in the budget (or nothing else is reserved),
        reserve them and return how many (at most the whole budget)."""
        nbytes = min(nbytes, self.receive_nbytes)
        with self._has_room:
            self._has_room.wait_for(lambda: not self.num_receiving_nbytes or
                                    self.num_receiving_nbytes + nbytes <= self.receive_nbytes)
            self.num_receiving_nbytes += nbytes
            self.max_receiving_nbytes = max(self.max_receiving_nbytes, self.num_receiving_nbytes)
        return nbytes

    def unreserve(self, nbytes: int) -> None:
        with self._has_room:
            self.num_receiving_nbytes -= nbytes
            self._has_room.notify_all()

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
        self._reserved_nbytes = 0
        self._reserve_lock = threading.Lock()

    def requests(self, items: Iterator) -> Iterator:
        """The client's request messages; raises StreamIdle once the watchdog cancelled. The
        data a put header announces is reserved (`BulkStreams.reserve`) before the next message
        is read, until `release`."""
        is_header = True
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
            if is_header and (nbytes := announced_nbytes(item)):
                # released by the thread that ends the call (_bulk_in's release), after this
                reserved = self._streams.reserve(nbytes)
                with self._reserve_lock:
                    self._reserved_nbytes += reserved
            is_header = False

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
        """Give back the stream's slot and reserved request bytes (idempotent)."""
        self._streams._release(self)
        with self._reserve_lock:
            nbytes, self._reserved_nbytes = self._reserved_nbytes, 0
        if nbytes:
            self._streams.unreserve(nbytes)

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
