"""Continuous batching with chunked prefill, prefix reuse on admission, and preemption.

Each step gets a token budget (max_num_batched_tokens). Running sequences go first in arrival
order (decodes cost one token, unfinished prompts continue in chunks); then waiting sequences are
admitted in arrival order while budget, sequence slots and pages last. The head of the waiting
queue is never skipped (FCFS, no starvation). When a running sequence needs a page and none is
free, the most recently arrived running sequence is preempted: its pages are released (full pages
stay in the prefix cache, and demote to the host tier if evicted), it goes back to the front of
the queue, and on readmission it reloads what is still cached and recomputes the rest.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmesh.workers.engine.block_manager import BlockManager
from kvmesh.workers.engine.sequence import LoadInFlight, PendingLoad, SeqStatus, Sequence

log = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    page_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before forward
    page_loads: list[tuple[int, Any]] = field(default_factory=list)  # (page_id, staged row)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


# Looks a waiting sequence up in the host tier / store past its device-cached pages:
# (seq, num_device_pages, max_pages) -> PendingLoad | None
LookupFn = Callable[[Sequence, int, int], "PendingLoad | None"]


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        lookup: LookupFn | None = None,
    ) -> None:
        self.bm = block_manager
        self.page_size = block_manager.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookup = lookup
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits: dict[str, int] = {"device": 0, "cpu": 0, "store": 0}
        # keys of pages admitted this schedule from loads still being checked (not cached yet)
        self._loading_keys: set[bytes] = set()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and release its pages (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.drop_load(seq)
        self.bm.release(seq.page_ids)
        seq.page_ids = []
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._loading_keys.clear()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.bm.can_allocate(self._pages_needed(seq, num_new)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted itself; running[i] is now the next sequence
            self._grow(seq, num_new, batch)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            admitted = self._admit(seq, budget, batch)
            if admitted is None:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(admitted)
            budget -= admitted
        return batch

    def reserve(self, seqs: list[Sequence], num_steps: int) -> bool:
        """Give each scheduled decoding sequence the pages for `num_steps` tokens from its
        next one (multi-step decode), all or nothing; False when they do not fit."""
        ps = self.page_size
        needed = [-(-(s.num_computed_tokens + num_steps) // ps) - len(s.page_ids) for s in seqs]
        if not self.bm.can_allocate(sum(n for n in needed if n > 0)):
            return False
        for seq, num in zip(seqs, needed, strict=True):
            if num > 0:
                seq.page_ids.extend(self.bm.allocate(num))
        return True

    # ------------------------------------------------------------------ internals
    def _pages_needed(self, seq: Sequence, num_new: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new) // self.page_size)
        needed = total - len(seq.page_ids)
        if self._shared_partial_page(seq) is not None:
            needed += 1  # copy-on-write
        return needed

    def _shared_partial_page(self, seq: Sequence) -> int | None:
        if seq.num_computed_tokens % self.page_size == 0:
            return None
        page_id = seq.page_ids[seq.num_computed_tokens // self.page_size]
        return page_id if self.bm.pages[page_id].ref_count > 1 else None

    def _grow(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> None:
        shared = self._shared_partial_page(seq)
        if shared is not None:
            new_id = self.bm.copy_on_write(shared)
            assert new_id is not None
            seq.page_ids[seq.num_computed_tokens // self.page_size] = new_id
            batch.page_copies.append((shared, new_id))
        total = -(-(seq.num_computed_tokens + num_new) // self.page_size)
        if total > len(seq.page_ids):
            seq.page_ids.extend(self.bm.allocate(total - len(seq.page_ids)))

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> int | None:
        """Match the prefix (device cache, then host tier / store), take pages for it and the
        first chunk. Returns the chunk length, or None when the pages do not fit now."""
        ps = self.page_size
        max_pages = (seq.num_tokens - 1) // ps  # leave at least one token to compute
        keys = seq.full_page_keys(max_pages)
        device_ids = self.bm.match_prefix(keys, (seq.page_tokens(p) for p in range(max_pages)))
        if len(device_ids) < max_pages and keys[len(device_ids)] in self._loading_keys:
            return None  # being loaded for another sequence: from the device cache next step
        pending = seq.pending_load
        if pending is not None and pending.start_page != len(device_ids):
            pending = None  # the device prefix changed since the lookup: look again
        if pending is None:
            if self.lookup is not None and len(device_ids) < max_pages:
                pending = self.lookup(seq, len(device_ids), max_pages)
            # a miss is remembered too, so a head that waits for pages is not looked up again
            pending = pending or PendingLoad(len(device_ids), [], [])
        seq.pending_load = loads = pending
        num_loaded = min(len(loads.payloads), max_pages - len(device_ids))
        num_matched = len(device_ids) + num_loaded
        num_computed = num_matched * ps
        num_new = min(seq.num_tokens - num_computed, budget)
        num_fresh = num_loaded + -(-(num_computed + num_new) // ps) - num_matched
        num_free_hits = sum(1 for p in device_ids if self.bm.pages[p].ref_count == 0)
        if not self.bm.can_allocate(num_fresh + num_free_hits):
            loads.settle()  # nothing stays in flight past this step
            return None
        self.bm.acquire(device_ids)
        self.bm.touch(device_ids)
        try:
            loaded_ids = self.bm.allocate(num_loaded)  # (may demote evicted pages: may raise)
        except BaseException:
            self.bm.release(device_ids)
            seq.pending_load = None
            loads.settle()
            raise
        # loads.payloads may hold more pages than this sequence can use now (max_pages)
        batch.page_loads.extend(zip(loaded_ids, loads.payloads, strict=False))
        seq.page_ids = device_ids + loaded_ids
        seq.num_computed_tokens = num_computed
        seq.num_registered_pages = len(device_ids)
        seq.pending_load = None
        if seq.is_first_admission:
            self.prefix_queries += max_pages
            self.prefix_hits["device"] += len(device_ids)
            seq.cached_tokens_by_tier = {"device": len(device_ids) * ps} if device_ids else {}
        assert seq.loading is None
        seq.loading = LoadInFlight(loads, len(device_ids), num_loaded, seq.is_first_admission)
        seq.is_first_admission = False
        if loads.is_settled:
            self.commit_load(seq)  # (all good: nothing to undo)
        else:
            self._loading_keys.update(keys[len(device_ids) : num_matched])
        self._grow(seq, num_new, batch)
        return num_new

    def commit_load(self, seq: Sequence) -> bool:
        """After the step that computed on a sequence's loaded pages: wait for their checks,
        enter the good ones in the prefix cache, and count their tiers. Returns False when a
        page failed: the sequence is then rewound to just before it (the step's tokens for it
        must be dropped; its later pages stay in its page table, uncached, and are computed
        again). True when nothing was loading."""
        loading, seq.loading = seq.loading, None
        if loading is None:
            return True
        first, end = loading.first_page, loading.first_page + loading.num_pages
        loading.load.start_checks()  # (they run on the device while the pages are entered)
        keys = seq.full_page_keys(end)
        # entered while the device still runs the step (nothing looks the prefix cache up
        # before the next schedule), and taken back out below from the first bad page on
        ps = self.page_size
        registered = [first + i for i in self.bm.register_run(
            seq.page_ids[first:end], keys[first:end], keys[first - 1] if first else None,
            seq.token_ids[first * ps : end * ps], seq.namespace)]
        num_ok = 0  # if the wait raises, none of them was checked: none stays cached
        try:
            num_ok = min(loading.load.settle(), loading.num_pages)
        finally:
            for index in registered:
                if index >= first + num_ok:
                    self.bm.unregister(seq.page_ids[index])
        seq.num_registered_pages = first + num_ok
        if loading.count_hits:
            by_tier = seq.cached_tokens_by_tier
            for tier, count in Counter(loading.load.tiers[:num_ok]).items():
                self.prefix_hits[tier] = self.prefix_hits.get(tier, 0) + count
                by_tier[tier] = by_tier.get(tier, 0) + count * self.page_size
        if num_ok == loading.num_pages:
            return True
        seq.num_computed_tokens = (first + num_ok) * self.page_size
        return False

    def drop_load(self, seq: Sequence) -> None:
        """Forget a sequence's load without using it (finish, abort, preemption, a failed step),
        after waiting for it: its copies may still read host memory that settling lets go, and
        its store leases end then. A load whose wait fails is logged and dropped anyway."""
        for load in (seq.pending_load, seq.loading.load if seq.loading is not None else None):
            if load is not None and not load.is_settled:
                try:
                    load.settle()
                except Exception:
                    log.warning("dropping a load that could not be settled", exc_info=True)
        seq.pending_load = seq.loading = None

    def _preempt(self, seq: Sequence) -> None:
        self.drop_load(seq)
        self.running.remove(seq)
        self.bm.release(seq.page_ids)
        seq.page_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_pages = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
