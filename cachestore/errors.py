"""Every exception type kvmesh.cachestore defines, in one module at the bottom of the package
(it imports nothing from kvmesh, so every layer may raise them).

Who sees what:
- A store caller (in process, or through StoreClient) sees the StoreError family: bad input
  (InvalidRequest, InvalidNamespace), a closed store, and on the client side the errors each
  gRPC status turns into. The two tables between errors and status codes are in
  cachestore/rpc/status.py, one each way.
- Tier-internal (TierUnavailable, TierFull): TieredStore turns them into misses and metrics, so
  they never reach a store caller.
- Page checks (PageCorrupt): a bad page is a miss and is dropped from its tier.
- Shared memory (SegmentUnusable): a segment that cannot be used; the call falls back to gRPC.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the errors a store caller can see."""


class InvalidRequest(StoreError, ValueError):
    """The caller's input is wrong (empty tokens, wrong payload count or size, bad page index).
    Maps to INVALID_ARGUMENT."""


class InvalidNamespace(ValueError):
    """A namespace field is missing or out of range."""


class StoreClosed(StoreError):
    """The store was closed; maps to UNAVAILABLE."""


class InvalidConfig(StoreError, ValueError):
    """A tier was configured with impossible values (negative capacity, unknown URL scheme)."""


# -- server side: what the servicer and its stream limits raise --------------------------------


class Forbidden(PermissionError):
    """The caller's token does not allow this call (PERMISSION_DENIED)."""


class StreamsExhausted(StoreError):
    """Too many bulk streams are running; maps to RESOURCE_EXHAUSTED (try again later)."""


class StreamIdle(StoreError):
    """The stream waited on its client too long and was cancelled; maps to DEADLINE_EXCEEDED."""


# -- client side: what a StoreClient raises for a status code -----------------------------------


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


# -- inside the store ----------------------------------------------------------------------------


class TierUnavailable(Exception):
    """The tier's backend cannot be reached (Redis down, remote store gone). TieredStore turns it
    into a miss and counts it; it never reaches a caller of the store."""


class TierFull(Exception):
    """The page cannot be stored: larger than the tier, or everything is pinned."""


class PageCorrupt(ValueError):
    """The bytes are not a valid page (bad magic, version, sizes or checksum)."""


class SegmentUnusable(Exception):
    """A segment name or file that cannot be mapped; `reason` is short and fixed, `detail` not."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason} ({detail})")
        self.reason, self.detail = reason, detail
