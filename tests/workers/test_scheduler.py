"""Scheduler with tiny specs and no model: token budgets, FCFS admission, prefix reuse,
preemption order. A step is simulated by advancing num_computed_tokens and appending a token."""

from __future__ import annotations

from kvmesh.cachestore.keys import Namespace
from kvmesh.workers.engine.block_manager import BlockManager
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.engine.scheduler import Scheduler
from kvmesh.workers.engine.sequence import SeqStatus, Sequence

PS = 4
NS = Namespace(model="tiny", num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32",
               page_size=PS)


def seq(name: str, num_tokens: int, arrival: int, first: int = 0) -> Sequence:
    return Sequence(name, 0, list(range(first, first + num_tokens)), num_tokens,
                    SamplingParams(temperature=0.0), NS, arrival=arrival)


def advance(sched: Scheduler, batch) -> None:
    """What the engine does after a forward: count the tokens, register full pages, and give
    every sequence that reached its end one new token."""
    for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        s.num_computed_tokens += n
        full = s.num_computed_tokens // PS
        keys = s.full_page_keys(full)
        for p in range(s.num_registered_pages, full):
            sched.bm.register(s.page_ids[p], keys[p], keys[p - 1] if p else None,
                              s.page_tokens(p), NS)
        s.num_registered_pages = full
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(1000 + s.num_tokens)


def test_chunked_prefill_splits_prompts_by_the_token_budget_fcfs():
    sched = Scheduler(BlockManager(32, PS), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq("a", 7, 0), seq("b", 9, 1, first=100)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_new_tokens == [7, 3]
    assert a.page_ids == [0, 1] and b.page_ids == [2]
    advance(sched, batch)
    batch = sched.schedule()  # a decodes (1 token), b continues its prompt (6 left)
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_new_tokens == [1, 6]
    assert b.page_ids == [2, 3, 4]


def test_waiting_head_is_never_skipped():
    sched = Scheduler(BlockManager(4, PS), max_num_seqs=8, max_num_batched_tokens=64)
    big, small = seq("big", 14, 0), seq("small", 2, 1, first=50)
    running = seq("running", 6, -1, first=200)
    sched.add(running)
    advance(sched, sched.schedule())  # holds 2 of the 4 pages
    sched.add(big)
    sched.add(small)
    batch = sched.schedule()
    # big needs 4 pages and only 2 are free; small would fit but must wait behind big
    assert [s.request_id for s in batch.seqs] == ["running"]
    assert list(sched.waiting) == [big, small]


def test_admission_reuses_cached_pages_and_leaves_one_token_to_compute():
    bm = BlockManager(16, PS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    first = seq("a", 8, 0)
    sched.add(first)
    advance(sched, sched.schedule())
    sched.remove(first)
    again = seq("b", 8, 1)  # the same 8 tokens: 2 full pages cached, but 1 token must run
    sched.add(again)
    batch = sched.schedule()
    assert again.page_ids == [0, 2]  # cached page 0 + a fresh page (cached page 1 is kept)
    assert again.num_computed_tokens == 4 and batch.num_new_tokens == [4]
    assert sched.prefix_queries == 2 and sched.prefix_hits["device"] == 1  # 1 page each
    assert again.cached_tokens_by_tier == {"device": 4}


def test_preemption_takes_the_latest_arrival_and_requeues_it_first():
    bm = BlockManager(4, PS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", 4, 0), seq("b", 4, 1, first=40)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())  # each holds 1 full page + needs a 2nd for its decode
    advance(sched, sched.schedule())  # both grew to 2 pages: the pool is full
    assert bm.num_free_pages == 0
    for _ in range(3):  # decodes fill page 2 of each
        advance(sched, sched.schedule())
    batch = sched.schedule()  # a needs a 3rd page: b (latest arrival) is preempted
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert sched.num_preemptions == 1
    assert b.status is SeqStatus.WAITING and list(sched.waiting) == [b]
    assert b.page_ids == [] and b.num_computed_tokens == 0
    assert b.num_tokens == 9  # its 5 generated tokens are kept and recomputed on readmission
