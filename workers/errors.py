"""Typed errors of the worker engine. The worker's gRPC service maps each to one status code."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors an engine caller can see."""


class InvalidRequest(EngineError, ValueError):
    """The request is wrong: empty or too long prompt, bad sampling params, duplicate id.
    Maps to INVALID_ARGUMENT."""


class InvalidConfig(EngineError, ValueError):
    """The worker was configured with impossible values."""


class ModelLoadError(EngineError):
    """The model could not be found or is not a supported (Llama-family) architecture."""


class OutOfPages(EngineError):
    """The KV pool cannot hold even one request of the given length. Maps to RESOURCE_EXHAUSTED."""
