"""Clients of the lookup socket (lookup_wire.py): LookupCalls for StoreClient (threads, typed
errors, gRPC Lookup as the fallback) and AsyncLookupSocket for the router's asyncio store probe.
Connections are pooled, each carrying one call at a time; a connection whose call did not end
cleanly (timeout, cancellation, broken pipe) is closed, never reused."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import grpc

from kvmesh.cachestore.client.breaker import CircuitBreaker
from kvmesh.cachestore.errors import StoreError, StoreUnavailable
from kvmesh.cachestore.rpc import lookup_wire

HELLO_RETRY_S = 30.0  # after no socket (or a broken one), ask LookupHello again this much later
MAX_IDLE_CONNECTIONS = 8


def socket_host(target: str) -> str | None:
    """The host of a gRPC target 'host:port' / '[v6]:port' (dns:, ipv4:, ipv6: prefixes too),
    where the lookup socket listens beside it; None for unix sockets and other forms."""
    if target.startswith("unix"):
        return None
    rest = target.removeprefix("dns:").lstrip("/").removeprefix("ipv4:").removeprefix("ipv6:")
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if rest.count(":") == 1:
        return rest.split(":", 1)[0]
    return None


class LookupSocket:
    """Thread-safe calls over pooled connections to one lookup socket."""

    def __init__(self, host: str, port: int, token: str | None, timeout: float | None) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self._hello = lookup_wire.hello(token)
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []

    def call(self, request: bytes) -> bytes:
        """LookupResponse bytes for LookupRequest bytes. Raises the typed error of an error
        reply (StoreUnavailable on a timeout); OSError when no connection works."""
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        is_reused = sock is not None
        while True:
            if sock is None:
                sock = socket.create_connection(self.address, timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(self._hello)
            try:
                sock.sendall(lookup_wire.frame(request))
                reply = lookup_wire.recv_frame(sock)
                break
            except TimeoutError:
                sock.close()
                raise StoreUnavailable(f"lookup socket {self.address}: no reply within "
                                       f"{self.timeout}s") from None
            except (OSError, StoreError):
                sock.close()
                if not is_reused:
                    raise
                sock, is_reused = None, False  # the server closed an idle one: once more
        try:
            code, body = lookup_wire.split_reply(reply)
        except BaseException:  # a reply we cannot read: the connection's state is unknown
            sock.close()
            raise
        if code is grpc.StatusCode.UNAUTHENTICATED:  # the server closes it
            sock.close()
        else:
            self._give_back(sock)
        if code is None:
            return body
        raise lookup_wire.error_of(code, body.decode(errors="replace"))

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


class LookupCalls:
    """StoreClient's Lookup over the lookup socket when the server offers one (asked with
    `hello`, which returns LookupHelloResponse.port), else None: the caller uses gRPC Lookup.
    A socket that stops answering (refused, reset) is dropped and the server asked again after
    HELLO_RETRY_S; error replies and timeouts raise as gRPC Lookup's would."""

    def __init__(self, target: str, token: str | None, timeout: float | None,
                 hello: Callable[[], int], breaker: CircuitBreaker | None = None) -> None:
        self.host = socket_host(target)
        self.breaker = breaker  # the client's: socket lookups count as its gRPC calls do
        self.token = token
        self.timeout = timeout
        self._hello = hello
        self._lock = threading.Lock()
        self._socket: LookupSocket | None = None
        self._next_hello = 0.0

    def call(self, request: bytes) -> bytes | None:
        """LookupResponse bytes, or None: ask gRPC Lookup."""
        sock = self._socket or self._open()
        if sock is None:
            return None
        if self.breaker is not None:
            self.breaker.admit()
        try:
            reply = sock.call(request)
        except StoreUnavailable:  # no reply in time
            if self.breaker is not None:
                self.breaker.record(is_failure=True)
            raise
        except StoreError:
            raise
        except OSError:  # the server went away or moved: gRPC says which
            with self._lock:
                if self._socket is sock:
                    self._socket = None
            sock.close()
            return None
        if self.breaker is not None:
            self.breaker.record(is_failure=False)
        return reply

    def _open(self) -> LookupSocket | None:
        if self.host is None or time.monotonic() < self._next_hello:
            return None
        with self._lock:
            if self._socket is None and time.monotonic() >= self._next_hello:
                self._next_hello = time.monotonic() + HELLO_RETRY_S
                try:
                    port = self._hello()
                except StoreError:  # an older server (UNIMPLEMENTED), or none: gRPC decides
                    return None
                if port:
                    self._socket = LookupSocket(self.host, port, self.token, self.timeout)
            return self._socket

    def close(self) -> None:
        with self._lock:
            sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


class AsyncLookupSocket:
    """The lookup socket from asyncio: pooled connections, one call each at a time."""

    def __init__(self, host: str, port: int, token: str | None) -> None:
        self.host, self.port = host, port
        self._hello = lookup_wire.hello(token)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def call(self, request: bytes) -> tuple[grpc.StatusCode | None, bytes]:
        """(None, LookupResponse bytes) or (status code, details) for LookupRequest bytes.
        Raises OSError when the connection fails; cancel it (asyncio.wait_for) to time out."""
        if self._idle:  # the server may have closed an idle one: then once more, anew
            try:
                return await self._call_on(*self._idle.pop(), request)
            except OSError:
                pass
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(self._hello)
        return await self._call_on(reader, writer, request)

    async def _call_on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       request: bytes) -> tuple[grpc.StatusCode | None, bytes]:
        try:
            writer.write(lookup_wire.frame(request))
            (nbytes,) = lookup_wire.LENGTH.unpack(
                await reader.readexactly(lookup_wire.LENGTH.size))
            if nbytes > lookup_wire.MAX_FRAME_NBYTES:
                raise ConnectionError(f"a lookup frame of {nbytes} bytes")
            code, body = lookup_wire.split_reply(await reader.readexactly(nbytes))
        except asyncio.IncompleteReadError:
            writer.close()
            raise ConnectionError("the lookup socket was closed") from None
        except BaseException:  # cancelled mid-call, or broken: the stream's state is unknown
            writer.close()
            raise
        if code is grpc.StatusCode.UNAUTHENTICATED or len(self._idle) >= MAX_IDLE_CONNECTIONS:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return code, body

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
