"""Exact prefix index over every worker's KV pages, fed by the workers' KvEvents streams.

Layout (sized for ~1,000 workers and ~1M pages): each worker gets a slot number; for each page
key the index keeps an int bitmask of the slots holding it in any tier (`_any`) and on the device
(`_device`). A prompt's chained keys are walked once, and-ing masks, so a decision costs
O(matched pages + workers that matched) and never O(all workers). Each worker also keeps its
own key -> tier-bits dict so a resync or a death drops exactly its entries.

Predicted entries (a prompt just routed to a worker) count as device pages of that worker for
`predicted_ttl_s`, so a burst of same-prefix prompts lands together before the events arrive.

Pure Python, not thread-safe: the router calls it from one asyncio loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvmesh.router.errors import SequenceGap

# Tier numbers as in proto kvmesh.v1.Tier.
TIER_DEVICE = 1
TIER_CPU = 2
TIER_DISK = 3
TIER_REDIS = 4
TIER_REMOTE = 5
_DEVICE_BIT = 1 << TIER_DEVICE
_ALL_TIER_BITS = sum(1 << t for t in range(1, 6))


@dataclass(frozen=True)
class Cleared:
    epoch: int


@dataclass(frozen=True)
class Stored:
    keys: Sequence[bytes]
    tier: int


@dataclass(frozen=True)
class Removed:
    keys: Sequence[bytes]
    tier: int  # 0 (unspecified) removes the keys from every tier


KvEventKind = Cleared | Stored | Removed


@dataclass(frozen=True)
class PrefixMatch:
    """What one worker holds of a prompt: contiguous pages from page 0."""

    num_pages: int  # in any of its tiers (or predicted)
    num_device_pages: int  # the leading part of num_pages that is on its device


class _Worker:
    __slots__ = ("worker_id", "slot", "bit", "pages", "is_synced", "next_seq", "epoch",
                 "last_event_time")

    def __init__(self, worker_id: str, slot: int) -> None:
        self.worker_id = worker_id
        self.slot = slot
        self.bit = 1 << slot
        self.pages: dict[bytes, int] = {}  # key -> bitmask of proto tiers holding it
        self.is_synced = False
        self.next_seq = 1
        self.epoch = 0
        self.last_event_time = 0.0


class PrefixIndex:
    def __init__(self, predicted_ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.predicted_ttl_s = predicted_ttl_s
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._by_slot: dict[int, _Worker] = {}
        self._free_slots: list[int] = []
        self._any: dict[bytes, int] = {}
        self._device: dict[bytes, int] = {}
        self._predicted: dict[bytes, int] = {}
        self._predicted_until: dict[tuple[bytes, int], float] = {}
        self._expiry: deque[tuple[float, bytes, int]] = deque()  # in expiry order (fixed TTL)

    # ---- workers -------------------------------------------------------------------------
    def add_worker(self, worker_id: str) -> None:
        if worker_id in self._workers:
            return
        slot = self._free_slots.pop() if self._free_slots else len(self._by_slot)
        worker = _Worker(worker_id, slot)
        self._workers[worker_id] = worker
        self._by_slot[slot] = worker

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and all its entries, real and predicted; frees its slot."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        self.drop_worker(worker_id, _worker=worker)
        for key in list(self._predicted):
            self._clear_predicted_bit(key, worker.bit)
        del self._by_slot[worker.slot]
        self._free_slots.append(worker.slot)

    def drop_worker(self, worker_id: str, *, _worker: _Worker | None = None) -> None:
        """Drop every page entry of a worker (dead or out of sync) at once; it stays known and
        is resynced by its next AllCleared."""
        worker = _worker or self._workers[worker_id]
        mask = ~worker.bit
        for key, bits in worker.pages.items():
            self._clear_bit(self._any, key, mask)
            if bits & _DEVICE_BIT:
                self._clear_bit(self._device, key, mask)
        worker.pages = {}
        worker.is_synced = False

    @property
    def worker_ids(self) -> list[str]:
        return list(self._workers)

    def is_synced(self, worker_id: str) -> bool:
        return self._workers[worker_id].is_synced

    def applied_seq(self, worker_id: str) -> int:
        """Sequence number of the last event applied from the worker's current subscription."""
        return self._workers[worker_id].next_seq - 1

    def num_pages(self, worker_id: str | None = None) -> int:
        if worker_id is None:
            return len(self._any)
        return len(self._workers[worker_id].pages)

    # ---- events --------------------------------------------------------------------------
    def apply(self, worker_id: str, seq: int, event: KvEventKind) -> bool:
        """Apply one KvEvent. Returns False when the event was ignored (worker awaiting resync).
        Raises SequenceGap (after dropping the worker's entries) when `seq` skips ahead."""
        worker = self._workers[worker_id]
        worker.last_event_time = self._clock()
        if isinstance(event, Cleared):
            self.drop_worker(worker_id, _worker=worker)
            worker.is_synced = True
            worker.epoch = event.epoch
            worker.next_seq = seq + 1
            return True
        if not worker.is_synced:
            return False
        if seq != worker.next_seq:
            expected = worker.next_seq
            self.drop_worker(worker_id, _worker=worker)
            raise SequenceGap(f"worker {worker_id}: expected seq {expected}, got {seq}")
        worker.next_seq = seq + 1
        if isinstance(event, Stored):
            self._store(worker, event.keys, 1 << event.tier)
        else:
            self._remove(worker, event.keys, (1 << event.tier) if event.tier else _ALL_TIER_BITS)
        return True

    def _store(self, worker: _Worker, keys: Iterable[bytes], tier_bit: int) -> None:
        pages, bit = worker.pages, worker.bit
        any_masks, device_masks = self._any, self._device
        for key in keys:
            old = pages.get(key, 0)
            pages[key] = old | tier_bit
            if not old:
                any_masks[key] = any_masks.get(key, 0) | bit
            if tier_bit == _DEVICE_BIT and not old & _DEVICE_BIT:
                device_masks[key] = device_masks.get(key, 0) | bit

    def _remove(self, worker: _Worker, keys: Iterable[bytes], tier_bits: int) -> None:
        pages, mask = worker.pages, ~worker.bit
        for key in keys:
            old = pages.get(key, 0)
            if not old:
                continue
            new = old & ~tier_bits
            if old & _DEVICE_BIT and not new & _DEVICE_BIT:
                self._clear_bit(self._device, key, mask)
            if new:
                pages[key] = new
            else:
                del pages[key]
                self._clear_bit(self._any, key, mask)

    @staticmethod
    def _clear_bit(masks: dict[bytes, int], key: bytes, keep: int) -> None:
        value = masks.get(key, 0) & keep
        if value:
            masks[key] = value
        else:
            masks.pop(key, None)

    # ---- predictions ---------------------------------------------------------------------
    def predict(self, worker_id: str, keys: Sequence[bytes]) -> None:
        """Record that `keys` will soon be on `worker_id`'s device (it was just routed there)."""
        worker = self._workers[worker_id]
        until = self._clock() + self.predicted_ttl_s
        for key in keys:
            self._predicted[key] = self._predicted.get(key, 0) | worker.bit
            self._predicted_until[(key, worker.slot)] = until
            self._expiry.append((until, key, worker.slot))

    def expire_predictions(self) -> None:
        now = self._clock()
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            until, key, slot = expiry.popleft()
            if self._predicted_until.get((key, slot)) == until:
                del self._predicted_until[(key, slot)]
                self._clear_predicted_bit(key, 1 << slot)

    def _clear_predicted_bit(self, key: bytes, bit: int) -> None:
        self._clear_bit(self._predicted, key, ~bit)

    @property
    def num_predicted(self) -> int:
        return len(self._predicted_until)

    # ---- lookups -------------------------------------------------------------------------
    def match(self, keys: Sequence[bytes]) -> dict[str, PrefixMatch]:
        """Contiguous prefix of `keys` each worker holds; workers holding none are left out.
        Does not modify the index (expired predictions are cleared first)."""
        self.expire_predictions()
        if not keys:
            return {}
        any_get, dev_get, pred_get = self._any.get, self._device.get, self._predicted.get
        first = keys[0]
        pred = pred_get(first, 0)
        run_any = any_get(first, 0) | pred
        run_dev = dev_get(first, 0) | pred
        depth_any: dict[int, int] = {}
        depth_dev: dict[int, int] = {}
        alive_any = run_any
        i = 1
        n = len(keys)
        while run_any and i < n:
            key = keys[i]
            pred = pred_get(key, 0)
            new_any = run_any & (any_get(key, 0) | pred)
            if run_dev:
                new_dev = run_dev & (dev_get(key, 0) | pred)
                if new_dev != run_dev:
                    _record(depth_dev, run_dev & ~new_dev, i)
                run_dev = new_dev
            if new_any != run_any:
                _record(depth_any, run_any & ~new_any, i)
            run_any = new_any
            i += 1
        _record(depth_any, run_any, i)
        _record(depth_dev, run_dev, i)
        by_slot = self._by_slot
        result: dict[str, PrefixMatch] = {}
        mask = alive_any
        while mask:
            low = mask & -mask
            slot = low.bit_length() - 1
            mask ^= low
            worker = by_slot.get(slot)
            if worker is not None:
                result[worker.worker_id] = PrefixMatch(depth_any[slot], depth_dev.get(slot, 0))
        return result


def _record(depths: dict[int, int], mask: int, depth: int) -> None:
    while mask:
        low = mask & -mask
        depths[low.bit_length() - 1] = depth
        mask ^= low
