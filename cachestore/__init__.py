"""kvmesh's tiered KV page store: page keys, codec, tiers, TieredStore, gRPC server and client.

`from kvmesh import StoreClient, Namespace, ClosestKV` (or the same from `kvmesh.cachestore`) is
the public entry point; the client (and with it grpc and torch) is imported on first use, so
`kvmesh.cachestore.keys` stays cheap for the router and the block manager.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmesh.cachestore.keys import Namespace

if TYPE_CHECKING:
    from kvmesh.cachestore.client.store_client import ClosestKV, StoreClient

__all__ = ["ClosestKV", "Namespace", "StoreClient"]


def __getattr__(name: str) -> Any:
    if name in ("StoreClient", "ClosestKV"):
        from kvmesh.cachestore.client import store_client as client

        return getattr(client, name)
    raise AttributeError(f"module 'kvmesh.cachestore' has no attribute {name!r}")
