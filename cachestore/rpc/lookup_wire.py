"""The lookup socket's wire format, both ends (server: lookup_server.py, clients:
cachestore/client/lookup.py). Lookup over gRPC costs ~0.6 ms of Python gRPC per call on
loopback before the store does any work; this is the same call over a plain TCP connection.

- The client opens a connection and sends, once: MAGIC, u32 token length, the bearer token
  (empty: none). The server checks it exactly as BearerAuth checks `authorization: Bearer
  <token>` and binds the connection to that token's scope; a refused token gets one error reply
  (UNAUTHENTICATED) and the connection is closed.
- Then any number of calls, one at a time: u32 length + a serialized LookupRequest; the reply is
  u32 length + u8 status + body, where status is 0 (OK, body: a serialized LookupResponse) or
  the gRPC status code's number that Lookup would have answered (body: its details, UTF-8).
Lengths are little-endian."""

from __future__ import annotations

import socket
import struct
import time

import grpc

from kvmesh.cachestore.errors import ProtocolError, StoreError
from kvmesh.cachestore.rpc import wire
from kvmesh.cachestore.rpc.status import ERROR_BY_STATUS

MAGIC = b"KVL1"
LENGTH = struct.Struct("<I")
OK = 0
MAX_TOKEN_NBYTES = 4096
# the largest LookupRequest: MAX_TOKENS token ids and a namespace spec
MAX_FRAME_NBYTES = 4 * wire.MAX_TOKENS + (64 << 10)
_RECV_CHUNK = 64 << 10  # buffers grow by what arrives, at most this per recv
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def hello(token: str | None) -> bytes:
    """A connection's first bytes."""
    given = token.encode() if token else b""
    return MAGIC + LENGTH.pack(len(given)) + given


def frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


def reply_frame(code: grpc.StatusCode | None, body: bytes) -> bytes:
    """A reply: `code` None is OK (body: LookupResponse bytes), else body is the details."""
    status = OK if code is None else code.value[0]
    return LENGTH.pack(len(body) + 1) + bytes((status,)) + body


def recv_exact(sock: socket.socket, nbytes: int, deadline: float | None = None) -> bytearray:
    """Exactly `nbytes` from `sock`; ConnectionError when the peer closes first. The buffer
    grows as bytes arrive (a declared length costs nothing until its bytes come). `deadline`
    (time.monotonic()): all of them by then, else TimeoutError (it sets the socket's timeout);
    None: only the socket's own timeout, per recv."""
    buf = bytearray()
    while len(buf) < nbytes:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the lookup socket's peer sent too slowly")
            sock.settimeout(left)
        got = sock.recv(min(nbytes - len(buf), _RECV_CHUNK))
        if not got:
            raise ConnectionError("the lookup socket was closed")
        buf += got
    return buf


def recv_frame(sock: socket.socket, timeout: float | None = None) -> bytearray:
    """One frame's body. The first byte waits as the socket's timeout says; with `timeout`, the
    rest of the frame must then arrive within that many seconds in all (TimeoutError)."""
    first = recv_exact(sock, 1)
    deadline = None if timeout is None else time.monotonic() + timeout
    (nbytes,) = LENGTH.unpack(first + recv_exact(sock, LENGTH.size - 1, deadline))
    if nbytes > MAX_FRAME_NBYTES:
        raise ProtocolError(f"a lookup frame of {nbytes} bytes, at most {MAX_FRAME_NBYTES}")
    return recv_exact(sock, nbytes, deadline)


def split_reply(reply: bytes | bytearray) -> tuple[grpc.StatusCode | None, bytes]:
    """(None, LookupResponse bytes) or (the error's status code, its details)."""
    if not reply:
        raise ProtocolError("an empty lookup reply")
    status, body = reply[0], bytes(reply[1:])
    if status == OK:
        return None, body
    code = _CODE_BY_NUMBER.get(status)
    if code is None:
        raise ProtocolError(f"a lookup reply with unknown status {status}")
    return code, body


def error_of(code: grpc.StatusCode, details: str) -> StoreError:
    """The error StoreClient raises for this status (the same table as status.typed_error)."""
    error_type = ERROR_BY_STATUS.get(code, StoreError)
    return error_type(f"{details} ({code.name})" if error_type is StoreError else details)
