"""Lookup, served twice: `answer` is the one Lookup (gRPC's KVStoreServicer.Lookup calls it), and
LookupListener serves it on the lookup socket (lookup_wire.py), which skips gRPC's per-call
cost. Both check the token with the same TokenTable.scope_of and scope the namespace with
auth.scoped_namespace, so a tenant token computes keys with its own salt on either path."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import grpc

from kvmesh.cachestore.errors import ProtocolError
from kvmesh.cachestore.rpc import lookup_wire, server_messages, wire
from kvmesh.cachestore.rpc.auth import Scope, TokenTable, scoped_namespace
from kvmesh.cachestore.rpc.status import status_of
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 5.0  # a connection that has not said who it is by then (in all) is closed
IDLE_TIMEOUT_S = 300.0  # clients pool connections; one idle this long is closed
FRAME_TIMEOUT_S = 10.0  # a request frame, once begun, must have arrived whole by then
MAX_UNAUTHENTICATED = 16  # connections not yet past the hello; more are closed at once
MAX_CONCURRENT_LOOKUPS = 8  # lookups answered at once; more wait for one of them
_parse = wire.make_parser(store_pb2.LookupRequest)


def answer(store: TieredStore, scope: Scope, request: Any) -> Any:
    """The LookupResponse for a parsed LookupRequest of a caller of `scope`; raises the typed
    errors of status.py's table. Metadata only: reads no page."""
    ns, token_ids = server_messages.parse_tokens_request(request)
    ns = scoped_namespace(ns, scope, write=False)
    result = store.lookup(ns, token_ids)
    return store_pb2.LookupResponse(num_tokens=result.num_tokens,
                                    tiers=[wire.tier_enum(t) for t in result.tiers])


class LookupListener:
    """The lookup socket: a TCP listener on `host` (port picked by the system: `.port`), one
    daemon thread per connection, at most `max_connections` at once, of which at most
    `max_unauthenticated` not yet past the hello (more are closed at once: their clients use
    gRPC Lookup). The hello must arrive whole within `hello_timeout` s, and each request frame,
    once begun, within `frame_timeout` s; at most `max_lookups` lookups are answered at once.
    Owns its sockets until `close`; the store stays the caller's."""

    def __init__(self, store: TieredStore, tokens: TokenTable, host: str,
                 max_connections: int = 256, max_unauthenticated: int = MAX_UNAUTHENTICATED,
                 max_lookups: int = MAX_CONCURRENT_LOOKUPS) -> None:
        self.store = store
        self.tokens = tokens
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self.hello_timeout = HELLO_TIMEOUT_S
        self.frame_timeout = FRAME_TIMEOUT_S
        self.idle_timeout = IDLE_TIMEOUT_S
        self._lookups = threading.BoundedSemaphore(max_lookups)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family, backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._unauthenticated = 0  # of _connections, those not yet past the hello
        self._is_closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="kvstore-lookup-accept",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and end every connection (their threads then exit)."""
        with self._lock:
            self._is_closed = True
            connections = list(self._connections)
        for sock in [self._listener, *connections]:
            _shut(sock)
        self._thread.join(timeout=5.0)

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                is_full = (self._is_closed or len(self._connections) >= self.max_connections
                           or self._unauthenticated >= self.max_unauthenticated)
                if not is_full:
                    self._connections.add(sock)
                    self._unauthenticated += 1
            if is_full:
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock,), name="kvstore-lookup",
                             daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        in_hello = True  # counted in _unauthenticated
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            scope = self._hello(sock)
            with self._lock:
                self._unauthenticated -= 1
                in_hello = False
            if scope is None:
                return
            while True:
                sock.settimeout(self.idle_timeout)  # for the frame's first byte
                body = lookup_wire.recv_frame(sock, self.frame_timeout)
                sock.settimeout(self.frame_timeout)  # for the reply's send
                sock.sendall(self._call(body, scope))
        except (OSError, ProtocolError):
            pass  # the client left, idled out, was too slow, or spoke garbage: it ends
        finally:
            with self._lock:
                self._connections.discard(sock)
                if in_hello:
                    self._unauthenticated -= 1
            _shut(sock)

    def _hello(self, sock: socket.socket) -> Scope | None:
        """The connection's scope, or None after telling the client why not. All of the hello
        must arrive within hello_timeout (TimeoutError), however it trickles in."""
        deadline = time.monotonic() + self.hello_timeout
        start = lookup_wire.recv_exact(sock, len(lookup_wire.MAGIC) + lookup_wire.LENGTH.size,
                                       deadline)
        if bytes(start[: len(lookup_wire.MAGIC)]) != lookup_wire.MAGIC:
            return None  # not a lookup client: nothing to tell it
        (nbytes,) = lookup_wire.LENGTH.unpack_from(start, len(lookup_wire.MAGIC))
        if nbytes > lookup_wire.MAX_TOKEN_NBYTES:
            return None
        token = bytes(lookup_wire.recv_exact(sock, nbytes, deadline))
        # the same check, with the same value, as BearerAuth's on `authorization` metadata
        scope = self.tokens.scope_of(b"Bearer " + token if token else None)
        if scope is None:
            message = "wrong bearer token" if token else "missing authorization"
            sock.sendall(lookup_wire.reply_frame(grpc.StatusCode.UNAUTHENTICATED,
                                                 message.encode()))
        return scope

    def _call(self, body: bytearray, scope: Scope) -> bytes:
        """The reply frame to one request frame of a connection of `scope`."""
        request = _parse(bytes(body))
        if isinstance(request, wire.BadMessage):
            return lookup_wire.reply_frame(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"Lookup: {request.reason}".encode())
        try:
            with self._lookups:
                reply = answer(self.store, scope, request)
        except Exception as exc:
            code = status_of(exc)
            if code is None:  # a bug: gRPC would answer UNKNOWN and log it
                log.exception("lookup socket: Lookup failed")
                code = grpc.StatusCode.UNKNOWN
            return lookup_wire.reply_frame(code, str(exc).encode())
        return lookup_wire.reply_frame(None, reply.SerializeToString())


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (the listener) or already gone
    sock.close()


def listen(store: TieredStore, tokens: TokenTable, host: str) -> LookupListener | None:
    """A started LookupListener, or None (logged) when `host` has no port for it: clients then
    use gRPC Lookup."""
    try:
        return LookupListener(store, tokens, host)
    except OSError as exc:
        log.warning("no lookup socket on %s (gRPC Lookup only): %s", host, exc)
        return None
