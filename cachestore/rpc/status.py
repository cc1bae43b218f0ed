"""The two tables between typed errors (cachestore.errors) and gRPC status codes: the server's
(error -> status, first match wins) and the client's (status -> error raised to the caller)."""

from __future__ import annotations

import grpc

from kvmesh.cachestore.errors import (
    Forbidden,
    InvalidNamespace,
    InvalidRequest,
    PermissionDenied,
    StoreClosed,
    StoreError,
    StoreFull,
    StoreUnavailable,
    StreamIdle,
    StreamsExhausted,
    TierFull,
    TierUnavailable,
    Unauthenticated,
)

STATUS_BY_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidNamespace, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (TierFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StreamsExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StreamIdle, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TierUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreClosed, grpc.StatusCode.UNAVAILABLE),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (PermissionError, grpc.StatusCode.UNAUTHENTICATED),
]

ERROR_BY_STATUS: dict[grpc.StatusCode, type[StoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: StoreFull,
    grpc.StatusCode.UNAVAILABLE: StoreUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: StoreUnavailable,
}


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status a servicer answers for `exc`; None for an error that is a bug."""
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code
    return None


def typed_error(exc: grpc.RpcError) -> StoreError:
    """The error a client raises for a failed call."""
    code, details = exc.code(), exc.details()  # a failed call is also a grpc.Call
    error_type = ERROR_BY_STATUS.get(code, StoreError)
    return error_type(f"{details} ({code.name})" if error_type is StoreError else details)
