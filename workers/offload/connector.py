"""The KV connector: the one interface between the engine and the tiers past the device pool
(host memory, a remote store), in the spirit of vLLM v1's KV connector.

Scheduler side (`engine.kv_load.SchedulerConnector`): `match`, how many pages past a sequence's
device prefix a tier holds, as a load whose state machine `engine.kv_load` runs.

Worker side:
- each load's `PageTransfer`: start its checks, wait for them (which releases its leases);
- its rows still arriving a layer run at a time (`pool_copies.ArrivingRows`): the runner moves
  layer run k into the pool just before computing it (`kv_pool.LayerRunLoads.wait(k)`);
- `save`: write newly cached device pages through to the tiers;
- `on_evict`: demote pages the block manager evicts.

`host_offload.KvOffload` implements it over the host tier and the store.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.shm.page_lease import PageLease
from kvmesh.workers.engine.block_manager import EvictedPage
from kvmesh.workers.engine.kv_load import SchedulerConnector
from kvmesh.workers.engine.outputs import KvEventData


class DevicePages(Protocol):
    """What a connector reads of the device pool (`runner.kv_pool.PoolPages`)."""

    def read_page(self, page_id: int) -> memoryview: ...

    def copy_to_host(self, page_ids: list[int]
                     ) -> tuple[list[torch.Tensor], list[int] | None, torch.cuda.Event | None]: ...

    def release_host_copies(self, slots: list[int]) -> None: ...


class PageStore(Protocol):
    """The remote store's key-level page API (`cachestore.rpc.client.StoreClient`)."""

    def get_pages_leased(self, keys: Sequence[bytes], prefix_only: bool = False,
                         mapped: bool = False) -> PageLease: ...

    def put_encoded_pages(self, pages: Sequence[tuple[bytes, bytes | memoryview]]) -> int: ...

    def put_pages_from(self, namespace: Namespace,
                       pages: Sequence[tuple[bytes, bytes, memoryview]]) -> int: ...

    def reserve_segment(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


class KvConnector(SchedulerConnector):
    """Called from the engine thread; an implementation may run threads of its own."""

    @abstractmethod
    def on_evict(self, pages: list[EvictedPage]) -> None:
        """Demote pages the block manager is evicting (shallowest first). Called before their
        slots are handed out again: their bytes are intact until it returns."""

    @abstractmethod
    def save(self, ns: Namespace, pages: list[tuple[bytes, list[int], int]]) -> None:
        """Write newly cached device pages, (key, token ids, page id) each, through to the
        tiers: their bytes are copied out before it returns (the pages may then change); the
        sending may go on later. Never fails the step: pages it cannot take are dropped and
        counted (`num_store_writes_dropped`)."""

    @property
    @abstractmethod
    def num_store_writes_dropped(self) -> int: ...

    @abstractmethod
    def pop_events(self) -> list[KvEventData]:
        """The tiers' KV events since the last call (pages stored in or removed from them)."""

    @abstractmethod
    def cached_keys(self) -> list[bytes]:
        """Keys of the pages held past the device that the router may count on (a resync)."""

    @abstractmethod
    def close(self) -> None:
        """Finish queued writes (bounded wait) and let the tiers go."""
