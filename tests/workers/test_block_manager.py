"""Block manager with tiny specs: exact page ids, ref counts, eviction order, CoW."""

from __future__ import annotations

import pytest

from kvmesh.cachestore.keys import Namespace
from kvmesh.workers.engine.block_manager import BlockManager, EvictedPage

PS = 4
NS = Namespace(model="tiny", num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32",
               page_size=PS)


def pages_of(tokens: list[int]) -> tuple[list[bytes], list[list[int]]]:
    keys = NS.page_keys(tokens)
    return keys, [tokens[i * PS : (i + 1) * PS] for i in range(len(keys))]


def fill(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Allocate and register every full page of `tokens` as one sequence would."""
    keys, page_tokens = pages_of(tokens)
    page_ids = bm.allocate(len(keys))
    for i, (page_id, key) in enumerate(zip(page_ids, keys, strict=True)):
        assert bm.register(page_id, key, keys[i - 1] if i else None, page_tokens[i])
    return page_ids


def test_allocate_hands_out_pages_in_order_and_counts_refs():
    bm = BlockManager(num_pages=5, page_size=PS)
    assert bm.allocate(2) == [0, 1]
    assert bm.allocate(1) == [2]
    assert [p.ref_count for p in bm.pages] == [1, 1, 1, 0, 0]
    assert bm.num_free_pages == 2
    assert not bm.can_allocate(3)
    with pytest.raises(RuntimeError):
        bm.allocate(3)
    bm.release([0, 1])
    assert bm.num_free_pages == 4
    # uncached pages return to the back of the free list, released deepest (last) first
    assert bm.allocate(3) == [3, 4, 1]


def test_prefix_match_verifies_tokens_and_stops_at_first_miss():
    bm = BlockManager(num_pages=8, page_size=PS)
    tokens = list(range(100, 112))  # 3 full pages
    ids = fill(bm, tokens)
    assert ids == [0, 1, 2]
    keys, page_tokens = pages_of(tokens)
    assert bm.match_prefix(keys, page_tokens) == [0, 1, 2]
    # same keys, different stored tokens (a forged collision) -> miss from that page on
    forged = [page_tokens[0], [9, 9, 9, 9], page_tokens[2]]
    assert bm.match_prefix(keys, forged) == [0]
    other_keys, other_tokens = pages_of(list(range(100, 104)) + [1, 2, 3, 4])
    assert bm.match_prefix(other_keys, other_tokens) == [0]
    # matching does not take references
    assert [bm.pages[i].ref_count for i in ids] == [1, 1, 1]


def test_shared_prefix_ref_counts_and_duplicate_register():
    bm = BlockManager(num_pages=8, page_size=PS)
    a = fill(bm, list(range(8)))
    keys, page_tokens = pages_of(list(range(8)))
    hit = bm.match_prefix(keys, page_tokens)
    bm.acquire(hit)
    assert [bm.pages[i].ref_count for i in a] == [2, 2]
    # a second copy of an already cached page stays private
    (dup,) = bm.allocate(1)
    assert not bm.register(dup, keys[0], None, page_tokens[0])
    assert bm.pages[dup].key is None
    bm.release(a)
    assert [bm.pages[i].ref_count for i in a] == [1, 1]
    assert bm.num_cached_pages == 2


def test_register_run_chains_parents_and_skips_keys_cached_already():
    bm = BlockManager(num_pages=8, page_size=PS)
    tokens = list(range(100, 100 + 4 * PS))
    keys, page_tokens = pages_of(tokens)
    (other,) = bm.allocate(1)
    assert bm.register(other, keys[2], keys[1], page_tokens[2])  # cached by another page
    bm.events = []
    ids = bm.allocate(4)
    assert bm.register_run(ids, keys, None, tokens, tag="t") == [0, 1, 3]
    assert [bm.pages[i].key for i in ids] == [keys[0], keys[1], None, keys[3]]
    assert [bm.pages[i].parent for i in (ids[0], ids[1], ids[3])] == [None, keys[0], keys[2]]
    assert bm.pages[ids[3]].token_ids == tuple(page_tokens[3]) and bm.pages[ids[3]].tag == "t"
    assert bm.events == [("stored", [keys[0]], None), ("stored", [keys[1]], keys[0]),
                         ("stored", [keys[3]], keys[2])]
    assert bm.match_prefix(keys, page_tokens) == [ids[0], ids[1], other, ids[3]]


def test_eviction_is_lru_deepest_first_and_reports_pages():
    evicted: list[EvictedPage] = []
    bm = BlockManager(num_pages=6, page_size=PS, on_evict=evicted.extend)
    a = fill(bm, list(range(0, 12)))  # pages 0, 1, 2
    b = fill(bm, list(range(50, 58)))  # pages 3, 4
    bm.release(a)  # released first: least recent; its deepest page (2) goes first
    bm.release(b)
    assert bm.num_free_pages == 6
    assert bm.allocate(1) == [5]  # the uncached page before any eviction
    assert bm.allocate(3) == [2, 1, 0]
    # reported once the allocation is done, shallowest first: demoted in prefix order
    assert [e.page_id for e in evicted] == [0, 1, 2]
    a_keys, a_tokens = pages_of(list(range(0, 12)))
    assert evicted[2].key == a_keys[2] and evicted[2].parent == a_keys[1]
    assert evicted[2].token_ids == tuple(a_tokens[2])
    assert evicted[0].parent is None
    assert bm.match_prefix(a_keys, a_tokens) == []
    removed = [keys for kind, keys, _ in bm.events if kind == "removed"]
    assert removed == [[a_keys[2]], [a_keys[1]], [a_keys[0]]]


def test_touch_refreshes_recency_of_free_cached_pages():
    bm = BlockManager(num_pages=4, page_size=PS)
    a = fill(bm, list(range(0, 4)))
    b = fill(bm, list(range(10, 14)))
    bm.release(a)
    bm.release(b)
    bm.touch(a)  # a was just looked up: b is now the least recent
    assert bm.allocate(3) == [2, 3, 1]


def test_acquire_takes_a_free_cached_page_out_of_the_lru():
    bm = BlockManager(num_pages=3, page_size=PS)
    a = fill(bm, list(range(4)))
    bm.release(a)
    assert bm.num_free_pages == 3
    bm.acquire(a)
    assert bm.num_free_pages == 2
    assert bm.allocate(2) == [1, 2]
    assert not bm.can_allocate(1)


def test_copy_on_write_of_a_shared_partial_page():
    bm = BlockManager(num_pages=4, page_size=PS)
    (partial,) = bm.allocate(1)
    bm.acquire([partial])  # a forked sibling shares it
    assert bm.pages[partial].ref_count == 2
    new = bm.copy_on_write(partial)
    assert new == 1
    assert bm.pages[partial].ref_count == 1 and bm.pages[new].ref_count == 1
    assert bm.copy_on_write(partial) is None  # now private


def test_clear_drops_only_unused_cached_pages():
    bm = BlockManager(num_pages=4, page_size=PS)
    a = fill(bm, list(range(4)))
    b = fill(bm, list(range(20, 24)))
    bm.release(a)
    assert bm.clear() == 1
    assert bm.num_cached_pages == 1 and bm.pages[b[0]].key is not None
    assert bm.events[-1] == ("cleared", [], None)


def test_unregister_takes_a_page_out_of_the_prefix_cache_and_keeps_it_private():
    bm = BlockManager(num_pages=4, page_size=PS)
    tokens = list(range(12))
    keys, page_tokens = pages_of(tokens)
    page_ids = fill(bm, tokens)
    bm.events = []
    bm.unregister(page_ids[1])
    assert bm.events == [("removed", [keys[1]], None)]
    assert bm.match_prefix(keys, page_tokens) == page_ids[:1]  # the chain ends there
    assert bm.num_cached_pages == 2 and bm.pages[page_ids[1]].ref_count == 1
    bm.release(page_ids)  # the unregistered page goes back uncached, the others stay cached
    assert bm.match_prefix(keys, page_tokens) == page_ids[:1]
    assert bm.num_free_pages == 4 and bm.num_cached_pages == 2
    with pytest.raises(AssertionError):
        bm.unregister(page_ids[0])  # no user left
