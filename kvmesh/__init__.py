"""kvmesh: a distributed, disaggregated KV-cache service for LLM inference.

Everything kvmesh ships imports under this one root. The repository keeps one folder per part
(`cachestore/`, `workers/`, `router/`, `kernels/`, `deploy/`, `loadgen/`); the install maps each
into this package (`kvmesh.cachestore`, ...), and the generated gRPC code lands in `kvmesh.v1`.

The public store API: `from kvmesh import StoreClient, Namespace` (also `kvmesh.cachestore`).
The client (and with it grpc and torch) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmesh.cachestore.keys import Namespace

if TYPE_CHECKING:
    from kvmesh.cachestore.client.store_client import ClosestKV, StoreClient

__all__ = ["ClosestKV", "Namespace", "StoreClient"]


def __getattr__(name: str) -> Any:
    if name in ("StoreClient", "ClosestKV"):
        from kvmesh import cachestore

        return getattr(cachestore, name)  # cachestore imports its client on first use
    raise AttributeError(f"module 'kvmesh' has no attribute {name!r}")
