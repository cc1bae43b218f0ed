"""Continuous batching with chunked prefill, prefix reuse on admission, and preemption.

Each step gets a token budget (max_num_batched_tokens). Running sequences go first in arrival
order (decodes cost one token, unfinished prompts continue in chunks); then waiting sequences are
admitted in arrival order while budget, sequence slots and pages last. The head of the waiting
queue is never skipped (FCFS, no starvation). When a running sequence needs a page and none is
free, the most recently arrived running sequence is preempted: its pages are released (full pages
stay in the prefix cache, and demote to the host tier if evicted), it goes back to the front of
the queue, and on readmission it reloads what is still cached and recomputes the rest.

Prefix loads from the host tier or the store are matched and tracked by `kv_load.KvLoads`.

Multi-step decode: a batch of greedy decodes may run as a window of several steps queued on
the device at once (`ScheduledBatch.num_steps`, pages reserved for every step), and the next
window may be queued behind it before its last step is read (`continue_window`). Page safety,
the whole rule: a sequence that finishes inside a window has its pages released at once, while
steps queued for its batch may still write into them. So pages are reserved for more steps only
while the batch is unchanged (`window_goes_on`: nobody waits, nobody in it finished or was
aborted), and `schedule` never runs while steps of a window are queued unread (the engine reads
them first).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvmesh.workers.engine.block_manager import BlockManager
from kvmesh.workers.engine.kv_load import KvLoads, SchedulerConnector
from kvmesh.workers.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    page_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before forward
    # (page_id, staged row: a runner.pool_copies.StagedRow a connector made) before forward
    page_loads: list[tuple[int, object]] = field(default_factory=list)
    num_steps: int = 1  # >1: a window of greedy decode steps, pages reserved for every one

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        connector: SchedulerConnector | None = None,
        decode_steps: int = 1,
        max_model_len: int = 1 << 31,
    ) -> None:
        self.bm = block_manager
        self.page_size = block_manager.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.loads = KvLoads(connector, block_manager, self.page_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0
        self._device_hits = 0
        self.decode_steps = decode_steps  # steps per window (1: multi-step decode off)
        # queue the next window before the last step of one is read (on with CUDA graphs,
        # where it overlaps; an eager window computes before its call returns, so there it
        # would only hold every window's tokens back by one; tests turn it on for the logic)
        self.continue_windows = False
        self.max_model_len = max_model_len

    @property
    def prefix_hits(self) -> dict[str, int]:
        """Pages found cached on admission, per tier (loaded ones once they passed)."""
        return {"device": self._device_hits, **self.loads.hits}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and release its pages (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.loads.drop(seq)
        self.bm.release(seq.page_ids)
        seq.page_ids = []
        seq.status = SeqStatus.FINISHED

    def finish_loads(self) -> set[int] | frozenset[int]:
        """After the step computed on them: `KvLoads.finish` (the seq_ids rewound)."""
        return self.loads.finish()

    def drop_loads(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.loads.drop(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self.loads.begin_schedule()
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
        batch.num_steps = self._window_steps(batch)
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
        if len(device_ids) < max_pages and self.loads.is_loading(keys[len(device_ids)]):
            return None  # being loaded for another sequence: from the device cache next step
        load = self.loads.match(seq, len(device_ids), max_pages)
        num_loaded = min(len(load.rows), max_pages - len(device_ids))
        num_matched = len(device_ids) + num_loaded
        num_computed = num_matched * ps
        num_new = min(seq.num_tokens - num_computed, budget)
        num_fresh = num_loaded + -(-(num_computed + num_new) // ps) - num_matched
        num_free_hits = sum(1 for p in device_ids if self.bm.pages[p].ref_count == 0)
        if not self.bm.can_allocate(num_fresh + num_free_hits):
            load.wait()  # nothing stays in flight past this step
            return None
        self.bm.acquire(device_ids)
        self.bm.touch(device_ids)
        try:
            loaded_ids = self.bm.allocate(num_loaded)  # (may demote evicted pages: may raise)
        except BaseException:
            self.bm.release(device_ids)
            self.loads.drop(seq)
            raise
        # load.rows may hold more pages than this sequence can use now (max_pages)
        batch.page_loads.extend(zip(loaded_ids, load.rows, strict=False))
        seq.page_ids = device_ids + loaded_ids
        seq.num_computed_tokens = num_computed
        seq.num_registered_pages = len(device_ids)
        if seq.is_first_admission:
            self.prefix_queries += max_pages
            self._device_hits += len(device_ids)
            seq.cached_tokens_by_tier = {"device": len(device_ids) * ps} if device_ids else {}
        self.loads.admit(seq, load, num_loaded, seq.is_first_admission)
        seq.is_first_admission = False
        self._grow(seq, num_new, batch)
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        self.loads.drop(seq)
        self.running.remove(seq)
        self.bm.release(seq.page_ids)
        seq.page_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_pages = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ multi-step decode
    def _window_steps(self, batch: ScheduledBatch) -> int:
        """Steps to run back to back for a scheduled batch: >1 only when every sequence decodes
        greedily, no load is still being checked, and pages for every step could be reserved
        (else 1: an ordinary step)."""
        if self.decode_steps <= 1 or any(n != 1 for n in batch.num_new_tokens):
            return 1
        seqs = batch.seqs
        if self.loads.has_admitted or any(not s.sampling.is_greedy or s.fork_pending
                                          for s in seqs):
            return 1
        num_steps = self._steps_left(seqs, 0)
        if num_steps <= 1 or not self.reserve(seqs, num_steps):
            return 1
        return num_steps

    def window_goes_on(self, batch: ScheduledBatch) -> bool:
        """Whether a window's batch may take more steps without scheduling: nobody waits and the
        running sequences are exactly the batch's, so none has finished or been aborted (they
        leave `running`) and no page was freed while steps of it may still write."""
        running = self.running
        return (not self.waiting and len(running) == len(batch.seqs)
                and set(map(id, running)) == set(map(id, batch.seqs)))

    def continue_window(self, batch: ScheduledBatch) -> int:
        """Steps to queue behind a window of `batch` whose last step is still unread, their
        pages reserved; 0 for none (continuing is off, the batch changed, or no room)."""
        if not self.continue_windows or not self.window_goes_on(batch):
            return 0
        num_steps = self._steps_left(batch.seqs, 1)
        if num_steps >= 1 and self.reserve(batch.seqs, 1 + num_steps):
            return num_steps
        return 0

    def _steps_left(self, seqs: list[Sequence], ahead: int) -> int:
        """Steps to queue for seqs when `ahead` steps are queued past their tokens: none past
        max_model_len, none beyond what the longest-running request still needs."""
        return min(self.decode_steps,
                   min(self.max_model_len - s.num_tokens - ahead for s in seqs),
                   max(s.sampling.max_tokens - s.num_output_tokens - ahead for s in seqs))
