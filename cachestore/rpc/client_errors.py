"""Errors a StoreClient raises, and the status code -> error table (the client side of the
server's STATUS_BY_ERROR)."""

from __future__ import annotations

import grpc

from kvmesh.cachestore.errors import InvalidRequest, StoreError


class StoreUnavailable(StoreError, ConnectionError):
    """The server cannot be reached, or answered UNAVAILABLE / DEADLINE_EXCEEDED."""


class Unauthenticated(StoreError, PermissionError):
    """The server refused the bearer token (or none was given)."""


class PermissionDenied(StoreError, PermissionError):
    """The token is valid but does not allow this call (a read-only or tenant-scoped token)."""


class StoreFull(StoreError):
    """The server answered RESOURCE_EXHAUSTED."""


class ProtocolError(StoreError):
    """The server's reply does not follow the KVStore protocol."""


# Status code -> error raised to the caller (the client side of the server's error table).
ERROR_BY_STATUS: dict[grpc.StatusCode, type[StoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: StoreFull,
    grpc.StatusCode.UNAVAILABLE: StoreUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: StoreUnavailable,
}


def typed_error(exc: grpc.RpcError) -> StoreError:
    code, details = exc.code(), exc.details()
    error_type = ERROR_BY_STATUS.get(code, StoreError)
    return error_type(f"{details} ({code.name})" if error_type is StoreError else details)
