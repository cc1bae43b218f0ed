"""Every typed router error, and the one table mapping client-facing ones to HTTP statuses.

`RouterError` and its subclasses reach a client (status and OpenAI error type in `HTTP_STATUS`).
`InvalidConfig` stops a router (or a launcher) from starting; `NoCandidate` and `SequenceGap`
are raised by the pure routing layer (`router/routing/`) and handled inside the router. Imports
nothing, so every router module may import it."""

from __future__ import annotations


class InvalidConfig(ValueError):
    """A router setting is missing or out of range."""


class NoCandidate(Exception):
    """No worker can take the request."""


class SequenceGap(Exception):
    """A worker's event stream skipped a sequence number; its entries were dropped and it must
    be resubscribed (the new subscription starts with AllCleared and a snapshot)."""


class RouterError(Exception):
    """Base of every error the router reports to a client; `code` is a short machine name."""

    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(RouterError):
    code = "invalid_request"


class Unauthenticated(RouterError):
    code = "invalid_api_key"


class ModelNotFound(RouterError):
    code = "model_not_found"


class NotFound(RouterError):
    code = "not_found"


class PromptTooLong(RouterError):
    code = "context_length_exceeded"


class RequestTooLarge(RouterError):
    """The body is larger than any request this server accepts needs."""

    code = "request_too_large"


class RequestTimeout(RouterError):
    """The client sent its body too slowly."""

    code = "request_timeout"


class Overloaded(RouterError):
    code = "rate_limit_exceeded"


class NoWorkerAvailable(RouterError):
    code = "no_worker_available"


class WorkerFailed(RouterError):
    """A worker failed after it had produced tokens, so the request cannot be retried."""

    code = "worker_failed"


class RequestFailed(RouterError):
    """The worker's engine failed on this request alone (and aborted it); the worker is fine,
    and another would fail the same way, so it is not retried."""

    code = "request_failed"


# error class -> (HTTP status, OpenAI error type). The one place statuses are chosen.
HTTP_STATUS: dict[type[RouterError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    PromptTooLong: (400, "invalid_request_error"),
    Unauthenticated: (401, "authentication_error"),
    ModelNotFound: (404, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),
    RequestTimeout: (408, "invalid_request_error"),
    RequestTooLarge: (413, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    NoWorkerAvailable: (503, "service_unavailable"),
    WorkerFailed: (503, "service_unavailable"),
    RequestFailed: (500, "internal_error"),
    RouterError: (500, "internal_error"),
}


def http_status(error: RouterError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return HTTP_STATUS[RouterError]


def error_body(error: RouterError) -> dict:
    """OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""
    _, error_type = http_status(error)
    return {
        "error": {
            "message": error.message,
            "type": error_type,
            "param": error.param,
            "code": error.code,
        }
    }

