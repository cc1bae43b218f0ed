"""A circuit breaker for a StoreClient's channel: a store that keeps timing out or cannot be
reached is skipped for a while, so each call costs its caller nothing instead of a deadline.

After `num_failures` calls in a row end UNAVAILABLE or DEADLINE_EXCEEDED, every call fails at
once with StoreUnavailable for `open_s` seconds; then calls go through again, and the first that
fails opens it again (one that succeeds closes it). Any other status means the store answered,
which counts as a success. A worker treats StoreUnavailable as a cache miss.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc

from kvmesh.cachestore.errors import StoreUnavailable

FAILURES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class CircuitBreaker(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Thread-safe client interceptor (grpc.intercept_channel)."""

    def __init__(self, num_failures: int = 3, open_s: float = 5.0) -> None:
        assert num_failures > 0 and open_s > 0
        self.num_failures, self.open_s = num_failures, open_s
        self._lock = threading.Lock()
        self._failures_in_a_row = 0
        self._open_until = 0.0
        self.num_skipped = 0  # calls failed at once while open

    @property
    def is_open(self) -> bool:
        with self._lock:
            return time.monotonic() < self._open_until

    def intercept_unary_unary(self, continuation, details, request):
        return self._watch(continuation(self._admit(details), request))

    def intercept_unary_stream(self, continuation, details, request):
        return self._watch(continuation(self._admit(details), request))

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return self._watch(continuation(self._admit(details), request_iterator))

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return self._watch(continuation(self._admit(details), request_iterator))

    def _admit(self, details: Any) -> Any:
        with self._lock:
            left = self._open_until - time.monotonic()
            if left > 0:
                self.num_skipped += 1
                raise StoreUnavailable(
                    f"store skipped for {left:.1f} s more: {self._failures_in_a_row} calls in a "
                    "row timed out or could not reach it")
        return details

    def _watch(self, call: Any) -> Any:
        call.add_done_callback(self._done)
        return call

    def _done(self, call: Any) -> None:
        code = call.code()
        if code == grpc.StatusCode.CANCELLED:  # the caller's own doing: says nothing
            return
        self.record(is_failure=code in FAILURES)

    # calls that do not go through the channel (the lookup socket) use these two
    def admit(self) -> None:
        """Raises StoreUnavailable while the breaker is open."""
        self._admit(None)

    def record(self, is_failure: bool) -> None:
        """A call ended: timed out or could not reach the store (is_failure), or answered."""
        with self._lock:
            if not is_failure:
                self._failures_in_a_row = 0
                return
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.num_failures:
                self._open_until = time.monotonic() + self.open_s
