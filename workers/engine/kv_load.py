"""A prefix load from the host tier or the store: the one place its state machine lives.

    match ──> PENDING ──admit──> ADMITTED ──finish──> VERIFIED  every page passed its checks
                 │                   │          └───> REWOUND   a page failed: the sequence goes
                 │                   │                          back to just before it
                 └──── drop ─────────┴──── drop ──> DROPPED   finish, abort, preemption, a
                                                              failed step

A connector (`SchedulerConnector.match`) makes a PENDING load for a waiting sequence: device
rows for the pages past its device-cached prefix, whose copies and checks may still be running
(its `PageTransfer`). The scheduler admits it (`KvLoads.admit`): the pages join the sequence's
page table and the next step computes on them before their checks are in. After that step
`KvLoads.finish` waits for the checks: the pages are entered in the prefix cache while the
device still runs (nothing looks the cache up before the next schedule), taken back out from
the first bad page on, their tiers counted on the sequence's first admission, and a sequence
with a bad page rewound to just before it (that step's token for it must be dropped). While a
load is ADMITTED unchecked its keys are guarded (`is_loading`): another sequence wanting the
same pages waits a step and then finds them in the device cache.

Plain Python: rows are the connector's (staged device tensors), kept here as opaque objects.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from kvmesh.workers.engine.sequence import Sequence

log = logging.getLogger(__name__)


class LoadState(Enum):
    PENDING = "pending"
    ADMITTED = "admitted"
    VERIFIED = "verified"
    REWOUND = "rewound"
    DROPPED = "dropped"


class PageTransfer(ABC):
    """The copies and checks of one load's rows that may still be running (a connector's)."""

    @abstractmethod
    def start_checks(self) -> None:
        """Queue the checks now (`wait` would; the caller has other work meanwhile). Does not
        raise: checks that cannot be queued count every row as bad."""

    @abstractmethod
    def wait(self) -> int:
        """Block until the copies and checks are done; returns how many leading rows passed.
        Drops a bad page from its tier, and ends every lease the rows were read from, also
        when it raises (then no row counts as checked). Called at most once."""


@dataclass(eq=False)
class KvLoad:
    """Pages start_page.. of one sequence found in a tier past its device-cached prefix:
    rows[i] (a device copy, opaque here: a `runner.pool_copies.StagedRow`) is page
    start_page + i, found in tier tiers[i]. `transfer` is set while copies or checks may still
    run; only the leading rows it counts may then be kept."""

    start_page: int
    rows: list[object]
    tiers: list[str]
    transfer: PageTransfer | None = None
    state: LoadState = LoadState.PENDING
    num_pages: int = 0  # pages admitted into the sequence's page table
    count_hits: bool = False  # admitted on the sequence's first admission: tiers go in its usage

    @property
    def is_checked(self) -> bool:
        return self.transfer is None

    def wait(self) -> int:
        """Wait for the copies and checks (once), keep the rows that passed; returns how many."""
        if self.transfer is not None:
            num_ok = self.transfer.wait()
            self.transfer = None
            del self.rows[num_ok:], self.tiers[num_ok:]
        return len(self.rows)


class SchedulerConnector(ABC):
    """The scheduler side of a KV connector (`offload.connector.KvConnector`)."""

    @abstractmethod
    def match(self, seq: Sequence, num_device_pages: int, max_pages: int) -> KvLoad | None:
        """Pages num_device_pages..max_pages - 1 of `seq` (past its device-cached prefix) that
        a tier holds, leading ones only (the first missing or bad page ends it), as a PENDING
        load; None for a miss. May start copying them into device rows the load owns, and hold
        tier leases, until the load is waited for (`KvLoad.wait`). Extends seq's key chain;
        changes nothing else of the sequence, and never touches the block manager."""


class PrefixCache(Protocol):
    """What a load needs of the block manager: entering pages in the prefix cache and taking
    one whose contents turned out bad back out."""

    def register_run(self, page_ids: list[int], keys: list[bytes], parent: bytes | None,
                     token_ids: list[int], tag: object = None) -> list[int]: ...

    def unregister(self, page_id: int) -> None: ...


_NONE_REWOUND: frozenset[int] = frozenset()


@dataclass
class KvLoads:
    """The loads of one scheduler's sequences, by seq_id. Engine thread only. `hits`: pages
    loaded per tier, counted on each sequence's first admission once they passed."""

    connector: SchedulerConnector | None
    cache: PrefixCache
    page_size: int
    hits: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "store": 0})
    _pending: dict[int, KvLoad] = field(default_factory=dict)
    _admitted: dict[int, tuple[Sequence, KvLoad]] = field(default_factory=dict)
    # keys of pages admitted this schedule from loads still being checked (not cached yet)
    _loading_keys: set[bytes] = field(default_factory=set)

    @property
    def has_admitted(self) -> bool:
        """Whether a load admitted this schedule is still unchecked (the step must finish it)."""
        return bool(self._admitted)

    def begin_schedule(self) -> None:
        self._loading_keys.clear()

    def is_loading(self, key: bytes) -> bool:
        return key in self._loading_keys

    def match(self, seq: Sequence, num_device_pages: int, max_pages: int) -> KvLoad:
        """seq's load past its num_device_pages device-cached pages: the one matched before,
        if it still starts there, else the connector's. A miss is an empty load, remembered
        too, so a head that waits for pages is not looked up again."""
        load = self._pending.get(seq.seq_id)
        if load is not None and load.start_page != num_device_pages:
            self.drop(seq)  # the device prefix changed since the lookup: look again
            load = None
        if load is None:
            if self.connector is not None and num_device_pages < max_pages:
                load = self.connector.match(seq, num_device_pages, max_pages)
            load = load or KvLoad(num_device_pages, [], [])
            self._pending[seq.seq_id] = load
        return load

    def admit(self, seq: Sequence, load: KvLoad, num_pages: int, count_hits: bool) -> None:
        """seq's page table now holds the load's first num_pages pages (from page
        load.start_page on). A checked load finishes now; an unchecked one stays ADMITTED,
        its keys guarded, until `finish` after the step that computes on it."""
        del self._pending[seq.seq_id]
        load.state, load.num_pages, load.count_hits = LoadState.ADMITTED, num_pages, count_hits
        if load.is_checked:
            self._finish(seq, load)  # (all good: nothing to undo)
        else:
            self._admitted[seq.seq_id] = (seq, load)
            self._loading_keys.update(seq.keys[load.start_page : load.start_page + num_pages])

    def finish(self) -> frozenset[int] | set[int]:
        """After the step that computed on the admitted loads: finish each, in admission
        order. Returns the seq_ids rewound (their step's tokens must be dropped). If a wait
        raises, the loads not finished yet stay admitted (`drop` them)."""
        if not self._admitted:
            return _NONE_REWOUND
        rewound = set()
        while self._admitted:
            seq_id = next(iter(self._admitted))
            seq, load = self._admitted.pop(seq_id)
            if not self._finish(seq, load):
                rewound.add(seq_id)
        return rewound

    def drop(self, seq: Sequence) -> None:
        """Forget seq's loads without using them (finish, abort, preemption, a failed step),
        after waiting for them: their copies may still read host memory that waiting lets go,
        and their store leases end then. A wait that fails is logged; the load goes anyway."""
        admitted = self._admitted.pop(seq.seq_id, None)
        for load in (self._pending.pop(seq.seq_id, None), admitted and admitted[1]):
            if load is None:
                continue
            if not load.is_checked:
                try:
                    load.wait()
                except Exception:
                    log.warning("dropping a load whose wait failed", exc_info=True)
            load.state = LoadState.DROPPED

    def _finish(self, seq: Sequence, load: KvLoad) -> bool:
        """Wait for the load's checks and keep what passed (see the module docstring). False
        when a page failed: seq is then rewound to just before it (its later pages stay in its
        page table, uncached, and are computed again)."""
        first, end = load.start_page, load.start_page + load.num_pages
        if load.transfer is not None:
            load.transfer.start_checks()  # (they run on the device while the pages are entered)
        keys = seq.full_page_keys(end)
        ps = self.page_size
        registered = [first + i for i in self.cache.register_run(
            seq.page_ids[first:end], keys[first:end], keys[first - 1] if first else None,
            seq.token_ids[first * ps : end * ps], seq.namespace)]
        num_ok = 0  # if the wait raises, none of them was checked: none stays cached
        try:
            num_ok = min(load.wait(), load.num_pages)
        finally:
            for index in registered:
                if index >= first + num_ok:
                    self.cache.unregister(seq.page_ids[index])
        seq.num_registered_pages = first + num_ok
        if load.count_hits:
            by_tier = seq.cached_tokens_by_tier
            for tier, count in Counter(load.tiers[:num_ok]).items():
                self.hits[tier] = self.hits.get(tier, 0) + count
                by_tier[tier] = by_tier.get(tier, 0) + count * ps
        if num_ok == load.num_pages:
            load.state = LoadState.VERIFIED
            return True
        seq.num_computed_tokens = (first + num_ok) * ps
        load.state = LoadState.REWOUND
        return False
