"""The prefix-load state machine (engine.kv_load) with a real scheduler and block manager and a
connector that hands out fake rows: pending -> admitted -> verified | rewound, and dropped."""

from __future__ import annotations

import pytest

from kvmesh.cachestore.keys import Namespace
from kvmesh.workers.engine.block_manager import BlockManager
from kvmesh.workers.engine.kv_load import KvLoad, LoadState, PageTransfer, SchedulerConnector
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.engine.scheduler import Scheduler
from kvmesh.workers.engine.sequence import Sequence

PS = 4
NS = Namespace(model="tiny", num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32",
               page_size=PS)


class Transfer(PageTransfer):
    """Checks that pass the first `num_ok` rows (or raise), counting the calls."""

    def __init__(self, num_ok: int, error: Exception | None = None) -> None:
        self.num_ok, self.error = num_ok, error
        self.calls: list[str] = []

    def start_checks(self) -> None:
        self.calls.append("start")

    def wait(self) -> int:
        self.calls.append("wait")
        if self.error is not None:
            raise self.error
        return self.num_ok


class Connector(SchedulerConnector):
    """Holds every page of every sequence in the "cpu" tier; checks pass `num_ok` rows."""

    def __init__(self, num_ok: int = 99, error: Exception | None = None) -> None:
        self.num_ok, self.error = num_ok, error
        self.transfers: list[Transfer] = []

    def match(self, seq, num_device_pages, max_pages):
        transfer = Transfer(self.num_ok, self.error)
        self.transfers.append(transfer)
        count = max_pages - num_device_pages
        return KvLoad(num_device_pages, [f"row{i}" for i in range(count)], ["cpu"] * count,
                      transfer)


def make(connector: Connector, num_pages: int = 16) -> tuple[Scheduler, BlockManager]:
    bm = BlockManager(num_pages, PS)
    return Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, connector=connector), bm


def seq(name: str, num_tokens: int = 13) -> Sequence:
    return Sequence(name, 0, list(range(num_tokens)), num_tokens, SamplingParams(), NS)


def test_a_good_load_is_computed_on_then_cached_and_counted():
    connector = Connector()
    sched, bm = make(connector)
    a, b = seq("a"), seq("b")  # the same 13 tokens: 3 full pages to load
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    # b waits: a's pages are being loaded and checked, b takes them from the device next step
    assert batch.seqs == [a] and list(sched.waiting) == [b]
    assert [row for _, row in batch.page_loads] == ["row0", "row1", "row2"]
    assert a.num_computed_tokens == 12 and batch.num_new_tokens == [1]
    keys = a.full_page_keys(3)
    assert bm.match_prefix(keys, [a.page_tokens(p) for p in range(3)]) == []  # not cached yet
    assert batch.num_steps == 1  # no multi-step window over an unchecked load
    (transfer,) = connector.transfers
    assert sched.finish_loads() == set()
    assert transfer.calls == ["start", "wait"]
    assert bm.match_prefix(keys, [a.page_tokens(p) for p in range(3)]) == a.page_ids[:3]
    assert a.num_registered_pages == 3
    assert sched.prefix_hits == {"device": 0, "cpu": 3, "store": 0}
    assert a.cached_tokens_by_tier == {"cpu": 12}
    a.num_computed_tokens += 1
    a.token_ids.append(7)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and b.cached_tokens_by_tier == {"device": 12}
    assert len(connector.transfers) == 1  # b was never looked up past the device


def test_a_bad_page_rewinds_to_just_before_it_and_leaves_the_rest_uncached():
    connector = Connector(num_ok=1)
    sched, bm = make(connector)
    a = seq("a")
    sched.add(a)
    batch = sched.schedule()
    assert batch.seqs == [a] and a.num_computed_tokens == 12
    loaded = list(a.page_ids[:3])
    assert sched.finish_loads() == {a.seq_id}  # this step's token for a must be dropped
    assert a.num_computed_tokens == PS and a.num_registered_pages == 1
    assert a.page_ids[:3] == loaded  # its later pages stay, uncached, to be computed again
    keys = a.full_page_keys(3)
    assert bm.match_prefix(keys, [a.page_tokens(p) for p in range(3)]) == loaded[:1]
    assert sched.prefix_hits["cpu"] == 1 and a.cached_tokens_by_tier == {"cpu": PS}
    assert [e[0] for e in bm.events] == ["stored"] * 3 + ["removed"] * 2
    batch = sched.schedule()  # computes from the bad page on
    assert batch.seqs == [a] and batch.num_new_tokens == [13 - PS]


def test_a_wait_that_raises_caches_nothing_and_the_error_goes_up():
    connector = Connector(error=RuntimeError("tier gone"))
    sched, bm = make(connector)
    a = seq("a")
    sched.add(a)
    sched.schedule()
    with pytest.raises(RuntimeError, match="tier gone"):
        sched.finish_loads()
    keys = a.full_page_keys(3)
    assert bm.match_prefix(keys, [a.page_tokens(p) for p in range(3)]) == []
    sched.drop_loads([a])  # (the engine's failed batch) the load is gone already: no wait
    assert connector.transfers[0].calls == ["start", "wait"]


def test_loads_are_dropped_on_abort_waiting_or_admitted():
    connector = Connector()
    sched, bm = make(connector, num_pages=3)  # a 13-token sequence needs 4 pages: waits
    waiting = seq("w")
    sched.add(waiting)
    assert sched.schedule().is_empty
    (pending,) = connector.transfers
    assert pending.calls == ["wait"]  # nothing stays in flight past the step
    load = sched.loads._pending[waiting.seq_id]
    assert load.state is LoadState.PENDING and load.is_checked
    assert sched.schedule().is_empty and len(connector.transfers) == 1  # not looked up again
    sched.remove(waiting)
    assert load.state is LoadState.DROPPED and not sched.loads._pending

    sched, bm = make(connector)
    admitted = seq("a")
    sched.add(admitted)
    sched.schedule()
    transfer = connector.transfers[-1]
    load = sched.loads._admitted[admitted.seq_id][1]
    assert load.state is LoadState.ADMITTED
    sched.remove(admitted)  # abort before the step's loads finished: waited for, then let go
    assert transfer.calls == ["wait"] and load.state is LoadState.DROPPED
    assert sched.finish_loads() == set() and bm.num_free_pages == 16
    assert bm.num_cached_pages == 0
