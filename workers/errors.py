"""Typed errors of a worker: the engine's and its gRPC service's, in one place.

The service maps each to one gRPC status in one table (`workers/service/servicer.py`,
`STATUS_BY_ERROR`). Imports nothing, so every layer of `kvmesh.workers` may import it."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors an engine caller can see."""


class InvalidRequest(EngineError, ValueError):
    """The request is wrong: empty or too long prompt, bad sampling params, duplicate id.
    Maps to INVALID_ARGUMENT."""


class InvalidConfig(EngineError, ValueError):
    """The worker was configured with impossible values."""


class ModelLoadError(EngineError):
    """The model could not be found, or its architecture or a config feature it uses is not
    supported (workers/models/registry.py names the supported ones)."""


class RequestFailed(EngineError):
    """One request raised inside the engine step (sampling or its postprocessing). The engine
    aborted it and freed its pages; the others go on. Maps to INTERNAL, marked as the request's
    own failure so a router neither retries it elsewhere nor blames the worker."""


class BatchFailed(EngineError):
    """The step failed in a way no single request explains (the model run, say). The engine
    aborted `request_ids`, the batch's requests; it keeps serving the rest. Maps to INTERNAL."""

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids


class WorkerNotReady(Exception):
    """The engine is still loading, failed to load, or the worker is shutting down.
    Maps to UNAVAILABLE."""


class EngineFailure(Exception):
    """The engine raised while running a step; the requests in flight were aborted.
    Maps to INTERNAL."""


class SubscriberTooSlow(Exception):
    """A KvEvents subscriber fell more than `streams.MAX_PENDING_EVENTS` behind and was dropped;
    it resubscribes and resyncs from a snapshot. Maps to RESOURCE_EXHAUSTED."""


class NoStore(Exception):
    """A prefill-only request reached a worker without a store: it has nowhere to hand the
    prompt's pages to. Maps to FAILED_PRECONDITION."""


class NoHostTier(Exception):
    """Pages were pushed to a worker without a host tier to keep them in. Maps to
    FAILED_PRECONDITION."""
