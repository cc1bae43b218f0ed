"""Routing policy: exact costs and choices on constructed states."""

from __future__ import annotations

import pytest

from kvmesh.router.errors import NoCandidate
from kvmesh.router.routing.index import PrefixMatch
from kvmesh.router.routing.policy import (
    BalanceThreshold,
    CostModel,
    Decision,
    WorkerLoad,
    choose,
    eligible,
    prefill_cost_ms,
)

COST = CostModel(prefill_ms_per_token=1.0, host_ms_per_token=0.25, store_ms_per_token=0.5,
                 queued_ms_per_token=1.0, running_ms_per_request=2.0)
IDLE = WorkerLoad()


def test_prefill_cost_counts_each_tier():
    # 100 tokens, pages of 10: 4 device pages, 2 host pages, store has 8 pages
    match = PrefixMatch(num_pages=6, num_device_pages=4)
    assert prefill_cost_ms(100, 10, match, 8, COST) == 20 * 0.25 + 20 * 0.5 + 20 * 1.0
    assert prefill_cost_ms(100, 10, None, 0, COST) == 100.0
    # a full hit still computes the last token
    assert prefill_cost_ms(40, 10, PrefixMatch(4, 4), 0, COST) == 1.0


def test_device_holder_beats_host_holder_beats_miss():
    matches = {"host": PrefixMatch(8, 0), "dev": PrefixMatch(8, 8)}
    loads = {"miss": IDLE, "host": IDLE, "dev": IDLE}
    decision = choose(128, 16, matches, loads, cost=COST)
    assert decision == Decision("dev", 1.0, 8, "prefix")
    decision = choose(128, 16, matches, loads, cost=COST, exclude=["dev"])
    assert decision == Decision("host", 127 * 0.25 + 1.0, 8, "prefix")


def test_load_outweighs_a_small_prefix():
    matches = {"a": PrefixMatch(1, 1)}  # 16 tokens saved
    loads = {"a": WorkerLoad(num_inflight=2, num_queued_tokens=40), "b": IDLE}
    decision = choose(100, 16, matches, loads, cost=COST)
    assert decision == Decision("b", 100.0, 0, "load")


def test_overloaded_holder_is_skipped():
    matches = {"a": PrefixMatch(50, 50)}
    loads = {"a": WorkerLoad(6), "b": WorkerLoad(1), "c": WorkerLoad(2)}
    # a: 6 - 1 >= 4 and 7 > 1.25 * (10 / 3) -> not eligible, however cheap its cache
    assert eligible(loads, BalanceThreshold(4, 1.25)) == ["b", "c"]
    decision = choose(800, 16, matches, loads, cost=COST, balance=BalanceThreshold(4, 1.25))
    assert decision == Decision("b", 802.0, 0, "load")
    # a looser threshold lets the cache win
    decision = choose(800, 16, matches, loads, cost=COST, balance=BalanceThreshold(8, 1.25))
    assert decision.worker_id == "a" and decision.reason == "prefix"


def test_store_pages_help_every_worker_equally():
    loads = {"a": WorkerLoad(1), "b": IDLE}
    decision = choose(160, 16, {}, loads, num_store_pages=10, cost=COST)
    assert decision == Decision("b", 159 * 0.5 + 1.0, 0, "load")


def test_ties_go_to_lower_load_then_candidate_order():
    loads = {"x": IDLE, "y": IDLE}
    assert choose(10, 16, {}, loads, cost=COST).worker_id == "x"
    zero = CostModel(running_ms_per_request=0.0)
    loads = {"x": WorkerLoad(1), "y": IDLE}
    assert choose(10, 16, {}, loads, cost=zero).worker_id == "y"


def test_ties_then_go_to_the_emptier_cache():
    loads = {"x": WorkerLoad(0, 0, num_cached_pages=50), "y": WorkerLoad(0, 0, 3),
             "z": WorkerLoad(0, 0, 3)}
    assert choose(10, 16, {}, loads, cost=COST) == Decision("y", 10.0, 0, "load")


def test_no_candidate():
    with pytest.raises(NoCandidate):
        choose(10, 16, {}, {})
    with pytest.raises(NoCandidate):
        choose(10, 16, {}, {"a": IDLE}, exclude=["a"])


def test_cost_model_rejects_negative():
    with pytest.raises(ValueError, match="prefill_ms_per_token"):
        CostModel(prefill_ms_per_token=-1)
