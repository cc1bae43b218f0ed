"""Typed errors of the cache store. The gRPC server maps each to one status code in one table.

TierUnavailable and TierFull (cachestore.tiers.base) are tier-internal: TieredStore turns them
into misses and metrics, so they never reach a store caller.
"""

from __future__ import annotations

from kvmesh.cachestore.codec import PageCorrupt
from kvmesh.cachestore.keys import InvalidNamespace
from kvmesh.cachestore.tiers.base import TierFull, TierUnavailable


class StoreError(Exception):
    """Base of the errors a store caller can see."""


class InvalidRequest(StoreError, ValueError):
    """The caller's input is wrong (empty tokens, wrong payload count or size, bad page index).
    Maps to INVALID_ARGUMENT."""


class StoreClosed(StoreError):
    """The store was closed; maps to UNAVAILABLE."""


class InvalidConfig(StoreError, ValueError):
    """A tier was configured with impossible values (negative capacity, unknown URL scheme)."""


__all__ = [
    "InvalidConfig",
    "InvalidNamespace",
    "InvalidRequest",
    "PageCorrupt",
    "StoreClosed",
    "StoreError",
    "TierFull",
    "TierUnavailable",
]
