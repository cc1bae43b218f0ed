"""PrefixIndex: exact depths per worker, tiers, sequence gaps, drops, predictions."""

from __future__ import annotations

import pytest

from kvmesh.cachestore.keys import Namespace
from kvmesh.router.errors import SequenceGap
from kvmesh.router.routing.index import (
    TIER_CPU,
    TIER_DEVICE,
    Cleared,
    PrefixIndex,
    PrefixMatch,
    Removed,
    Stored,
)

NS = Namespace(model="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", page_size=4)
TOKENS = list(range(100, 141))  # 41 tokens -> 10 full pages
KEYS = NS.page_keys(TOKENS)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def synced(index: PrefixIndex, *workers: str) -> None:
    for w in workers:
        index.add_worker(w)
        index.apply(w, 1, Cleared(epoch=7))


def test_match_reports_contiguous_depth_and_device_part_per_worker():
    index = PrefixIndex()
    synced(index, "a", "b", "c")
    assert len(KEYS) == 10
    index.apply("a", 2, Stored(KEYS[:6], TIER_DEVICE))
    index.apply("a", 3, Stored(KEYS[6:8], TIER_CPU))
    index.apply("b", 2, Stored(KEYS[:3], TIER_DEVICE))
    index.apply("b", 3, Stored(KEYS[4:10], TIER_DEVICE))  # hole at page 3: prefix ends there
    index.apply("c", 2, Stored(KEYS[1:], TIER_DEVICE))  # no page 0: nothing usable
    assert index.match(KEYS) == {"a": PrefixMatch(8, 6), "b": PrefixMatch(3, 3)}
    assert index.match(KEYS[:2]) == {"a": PrefixMatch(2, 2), "b": PrefixMatch(2, 2)}
    assert index.match([]) == {}
    assert index.num_pages() == 10
    assert index.num_pages("a") == 8


def test_other_tenant_keys_do_not_match():
    index = PrefixIndex()
    synced(index, "a")
    index.apply("a", 2, Stored(KEYS, TIER_DEVICE))
    other = NS.with_salt("tenant-2").page_keys(TOKENS)
    assert index.match(other) == {}
    assert index.match(KEYS)["a"] == PrefixMatch(10, 10)


def test_removing_device_copy_keeps_host_copy():
    index = PrefixIndex()
    synced(index, "a")
    index.apply("a", 2, Stored(KEYS[:4], TIER_DEVICE))
    index.apply("a", 3, Stored(KEYS[2:4], TIER_CPU))  # demoted: stored on cpu ...
    index.apply("a", 4, Removed(KEYS[2:4], TIER_DEVICE))  # ... then freed on device
    assert index.match(KEYS) == {"a": PrefixMatch(4, 2)}
    index.apply("a", 5, Removed(KEYS[3:4], 0))  # tier 0 removes every copy
    assert index.match(KEYS) == {"a": PrefixMatch(3, 2)}
    index.apply("a", 6, Removed(KEYS[9:], TIER_DEVICE))  # unknown key: no-op
    assert index.num_pages("a") == 3


def test_sequence_gap_drops_entries_and_waits_for_resync():
    index = PrefixIndex()
    synced(index, "a", "b")
    index.apply("a", 2, Stored(KEYS[:5], TIER_DEVICE))
    index.apply("b", 2, Stored(KEYS[:2], TIER_DEVICE))
    with pytest.raises(SequenceGap, match="expected seq 3, got 4"):
        index.apply("a", 4, Stored(KEYS[5:], TIER_DEVICE))
    assert not index.is_synced("a")
    assert index.match(KEYS) == {"b": PrefixMatch(2, 2)}
    # events of the broken subscription are ignored until AllCleared starts a new one
    assert index.apply("a", 5, Stored(KEYS, TIER_DEVICE)) is False
    assert index.match(KEYS) == {"b": PrefixMatch(2, 2)}
    assert index.apply("a", 1, Cleared(epoch=8)) is True
    assert index.apply("a", 2, Stored(KEYS[:7], TIER_DEVICE)) is True  # snapshot
    assert index.match(KEYS) == {"a": PrefixMatch(7, 7), "b": PrefixMatch(2, 2)}
    assert index.applied_seq("a") == 2


def test_cleared_replaces_previous_state():
    index = PrefixIndex()
    synced(index, "a")
    index.apply("a", 2, Stored(KEYS, TIER_DEVICE))
    index.apply("a", 1, Cleared(epoch=9))  # reconnect: new subscription, new snapshot
    index.apply("a", 2, Stored(KEYS[:2], TIER_CPU))
    assert index.match(KEYS) == {"a": PrefixMatch(2, 0)}
    assert index.num_pages() == 2


def test_dead_worker_entries_dropped_at_once_and_slot_reused():
    index = PrefixIndex()
    synced(index, "a", "b")
    index.apply("a", 2, Stored(KEYS, TIER_DEVICE))
    index.apply("b", 2, Stored(KEYS[:3], TIER_DEVICE))
    index.drop_worker("a")
    assert index.match(KEYS) == {"b": PrefixMatch(3, 3)}
    assert index.num_pages() == 3
    index.apply("a", 1, Cleared(epoch=1))
    index.apply("a", 2, Stored(KEYS[:1], TIER_DEVICE))
    index.remove_worker("a")
    assert index.worker_ids == ["b"]
    synced(index, "c")  # takes a's freed slot: must not inherit anything
    assert index.match(KEYS) == {"b": PrefixMatch(3, 3)}
    index.apply("c", 2, Stored(KEYS[:1], TIER_CPU))
    assert index.match(KEYS) == {"b": PrefixMatch(3, 3), "c": PrefixMatch(1, 0)}


def test_predictions_count_as_device_until_ttl():
    clock = Clock()
    index = PrefixIndex(predicted_ttl_s=2.0, clock=clock)
    synced(index, "a", "b")
    index.apply("b", 2, Stored(KEYS[:2], TIER_CPU))
    index.predict("a", KEYS[:6])
    assert index.match(KEYS) == {"a": PrefixMatch(6, 6), "b": PrefixMatch(2, 0)}
    index.predict("b", KEYS[:4])  # predicted on top of real cpu pages: device now
    assert index.match(KEYS)["b"] == PrefixMatch(4, 4)
    clock.now += 1.0
    index.predict("a", KEYS[:3])  # renews pages 0-2 of a until t+3
    clock.now += 1.5  # first predictions expired, the renewal has not
    assert index.match(KEYS) == {"a": PrefixMatch(3, 3), "b": PrefixMatch(2, 0)}
    assert index.num_predicted == 3
    clock.now += 1.0
    assert index.match(KEYS) == {"b": PrefixMatch(2, 0)}
    assert index.num_predicted == 0


def test_remove_worker_drops_its_predictions():
    index = PrefixIndex()
    synced(index, "a", "b")
    index.predict("a", KEYS[:3])
    index.remove_worker("a")
    synced(index, "c")
    assert index.match(KEYS) == {}
