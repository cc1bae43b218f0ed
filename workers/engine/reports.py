"""What the engine reports besides tokens: its stats, the KV events the router indexes pages
by, and the snapshot of every cached page that resyncs the router."""

from __future__ import annotations

from typing import Protocol

from kvmesh.workers.engine.block_manager import BlockManager
from kvmesh.workers.engine.kv_events import coalesce_block_events, snapshot_events
from kvmesh.workers.engine.outputs import EngineStats, KvEventData
from kvmesh.workers.engine.scheduler import Scheduler


class TierReports(Protocol):
    """What the reports read of the KV connector (`offload.connector.KvConnector`)."""

    @property
    def num_store_writes_dropped(self) -> int: ...

    def pop_events(self) -> list[KvEventData]: ...

    def cached_keys(self) -> list[bytes]: ...


class EngineReports:
    """The engine's base for its reports. Engine thread only."""

    scheduler: Scheduler
    block_manager: BlockManager
    offload: TierReports

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_pages_total=self.block_manager.num_pages,
            num_pages_free=self.block_manager.num_free_pages,
            num_running=len(s.running), num_waiting=len(s.waiting),
            prefix_queries=s.prefix_queries, prefix_hits=dict(s.prefix_hits),
            num_preemptions=s.num_preemptions,
            num_store_writes_dropped=self.offload.num_store_writes_dropped)

    def pop_kv_events(self) -> list[KvEventData]:
        """The device pool's KV events since the last call (coalesced), then the tiers'; both
        queues are emptied."""
        events = coalesce_block_events(self.block_manager.events)
        self.block_manager.events = []
        return events + self.offload.pop_events()

    def cached_pages(self) -> list[KvEventData]:
        return snapshot_events(self.block_manager.cached_entries(), self.offload.cached_keys())
