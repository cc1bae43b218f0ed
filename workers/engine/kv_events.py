"""KV events of the device cache as KvEventData: coalesced deltas and resync snapshots."""

from __future__ import annotations

from kvmesh.workers.engine.block_manager import Page
from kvmesh.workers.engine.outputs import KvEventData


def coalesce_block_events(events: list[tuple[str, list[bytes], bytes | None]]) -> list[KvEventData]:
    """Block manager events -> KvEventData, merging runs of the same kind; a "stored" run is
    merged only while each page's parent is the previous page (one chain per event)."""
    out: list[KvEventData] = []
    for kind, keys, parent in events:
        last = out[-1] if out else None
        if last is not None and last.kind == kind == "removed":
            last.keys.extend(keys)
        elif (last is not None and last.kind == kind == "stored" and last.keys
              and parent == last.keys[-1]):
            last.keys.extend(keys)
        else:
            out.append(KvEventData(kind, list(keys), parent, "device"))
    return out


def snapshot_events(device_pages: list[Page], host_keys: list[bytes]) -> list[KvEventData]:
    """Everything cached now: one "stored" event per device page (with its parent), then the
    host tier's keys in one event."""
    out = [KvEventData("stored", [p.key], p.parent, "device") for p in device_pages
           if p.key is not None]
    if host_keys:
        out.append(KvEventData("stored", list(host_keys), None, "cpu"))
    return out
