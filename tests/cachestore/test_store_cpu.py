"""TieredStore over the CPU tier: prefix semantics, verification, bad input, LRU, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvmesh.cachestore.codec import encode_page, header_nbytes
from kvmesh.cachestore.errors import InvalidConfig, InvalidRequest, StoreClosed
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.cpu import CpuTier

NS = Namespace("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
               page_size=4)  # page payload: 2*2*4*2*8*2 = 512 bytes
PAGE_BLOB_NBYTES = header_nbytes(4) + 512


@pytest.fixture
def store():
    s = TieredStore([CpuTier(capacity_bytes=64 * PAGE_BLOB_NBYTES, pin_memory=False)])
    yield s
    s.close()


def test_round_trip_returns_exact_payloads(store, pages):
    tokens = pages.tokens(4 * 5 + 3)  # 5 full pages and a partial one
    payloads = pages.payloads(NS, 5)
    assert store.put(NS, tokens, payloads) == 5
    assert store.put(NS, tokens, payloads) == 0  # present: no-op
    got = store.get_closest(NS, tokens)
    assert got is not None
    assert got.num_tokens == 20
    assert got.tiers == ["cpu"] * 5
    assert [bytes(p) for p in got.payloads] == payloads
    assert all(isinstance(p, memoryview) and p.nbytes == NS.page_nbytes for p in got.payloads)
    assert store.lookup(NS, tokens).num_tokens == 20


def test_prefix_of_longer_prompt_and_of_shorter_prompt(store, pages):
    tokens = pages.tokens(16)
    payloads = pages.payloads(NS, 4)
    store.put(NS, tokens, payloads)
    longer = tokens + pages.tokens(9, offset=1)
    got = store.get_closest(NS, longer)
    assert got is not None and got.num_tokens == 16
    shorter = store.get_closest(NS, tokens[:11])
    assert shorter is not None and shorter.num_tokens == 8
    assert [bytes(p) for p in shorter.payloads] == payloads[:2]
    diverged = tokens[:5] + [tokens[5] + 1] + tokens[6:]
    assert store.get_closest(NS, diverged).num_tokens == 4  # page 1 differs -> key differs


def test_gap_ends_the_prefix(store, pages):
    tokens = pages.tokens(24)
    store.put(NS, tokens, pages.payloads(NS, 6))
    assert store.delete(NS, tokens, page_indices=[2]) == 1
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 8 and len(got.payloads) == 2
    assert store.lookup(NS, tokens).num_tokens == 8
    assert store.delete(NS, tokens, page_indices=[0]) == 1
    assert store.get_closest(NS, tokens) is None
    assert store.lookup(NS, tokens).num_tokens == 0


def test_miss_and_partial_page(store, pages):
    assert store.get_closest(NS, pages.tokens(12)) is None
    assert store.get_closest(NS, pages.tokens(3)) is None  # no full page, no key
    assert store.put(NS, pages.tokens(3), []) == 0


def test_namespace_and_tenant_separation(store, pages):
    tokens = pages.tokens(8)
    store.put(NS, tokens, pages.payloads(NS, 2))
    assert store.get_closest(NS.with_salt("tenant-b"), tokens) is None
    other_model = Namespace("other", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
                            page_size=4)
    assert store.get_closest(other_model, tokens) is None


def test_collision_same_key_other_tokens_is_a_miss_and_dropped(store, pages):
    tier = store.tiers[0]
    tokens = pages.tokens(8)
    keys = NS.page_keys(tokens)
    payload = pages.payloads(NS, 1)[0]
    other = tokens_to_bytes(pages.tokens(4, offset=7))
    tier.put_many([(keys[0], encode_page(NS, keys[0], other, payload))])
    assert store.get_closest(NS, tokens) is None
    assert tier.contains_many(keys) == [False, False]  # dropped
    assert store.stats()[0].errors == 1


@pytest.mark.parametrize("offset", [0, 7, 40, header_nbytes(4) + 100, PAGE_BLOB_NBYTES - 1])
def test_flipped_byte_in_stored_page_is_never_returned(store, pages, offset):
    tier = store.tiers[0]
    tokens = pages.tokens(12)
    payloads = pages.payloads(NS, 3)
    keys = NS.page_keys(tokens)
    good = [encode_page(NS, keys[i], tokens_to_bytes(tokens[4 * i: 4 * i + 4]), payloads[i])
            for i in range(3)]
    bad = bytearray(good[1])
    bad[offset] ^= 0x01
    tier.put_many([(keys[0], good[0]), (keys[1], bytes(bad)), (keys[2], good[2])])
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 4 and bytes(got.payloads[0]) == payloads[0]
    assert tier.contains_many(keys) == [True, False, True]
    assert store.stats()[0].errors == 1


def test_bad_input_raises_invalid_request(store, pages):
    tokens = pages.tokens(8)
    with pytest.raises(InvalidRequest, match="must not be empty"):
        store.put(NS, [], [])
    with pytest.raises(InvalidRequest, match="must not be empty"):
        store.get_closest(NS, [])
    with pytest.raises(InvalidRequest, match="2 full pages .* need 2 payloads, got 1"):
        store.put(NS, tokens, pages.payloads(NS, 1))
    with pytest.raises(InvalidRequest, match="payload 1 is 511 bytes"):
        store.put(NS, tokens, [b"\0" * 512, b"\0" * 511])
    with pytest.raises(InvalidRequest, match="1-D"):
        store.lookup(NS, [[1, 2], [3, 4]])
    with pytest.raises(InvalidRequest, match="must be integers, got float64"):
        store.lookup(NS, [1.5, 2, 3, 4])
    with pytest.raises(InvalidRequest, match="must be integers, got bool"):
        store.lookup(NS, [True] * 4)
    with pytest.raises(InvalidRequest, match=r"in \[0, 2147483647\], got \[-1, 3\]"):
        store.get_closest(NS, [-1, 1, 2, 3])
    with pytest.raises(InvalidRequest, match="must be integers, got object"):
        store.put(NS, [2**70, 1, 2, 3], pages.payloads(NS, 1))
    with pytest.raises(InvalidRequest, match=r"got \[1, 2147483648\]"):
        store.put(NS, np.array([2**31, 1, 2, 3], dtype=np.int64), pages.payloads(NS, 1))
    with pytest.raises(InvalidRequest, match="namespace must be a Namespace"):
        store.lookup("m", tokens)
    with pytest.raises(InvalidRequest, match=r"page indices \[2\] out of range"):
        store.delete(NS, tokens, page_indices=[0, 2])
    assert issubclass(InvalidRequest, ValueError)
    assert store.lookup(NS, tokens).num_tokens == 0  # nothing half-stored
    assert store.lookup(NS, np.array(tokens, dtype=np.uint16)).num_tokens == 0  # any int dtype


def test_numpy_and_list_tokens_give_the_same_pages(store, pages):
    tokens = pages.tokens(8)
    payloads = pages.payloads(NS, 2)
    store.put(NS, np.array(tokens, dtype=np.int64), payloads)
    assert [bytes(p) for p in store.get_closest(NS, tokens).payloads] == payloads
    assert store.get_closest(NS, np.array(tokens, dtype="<i4")).num_tokens == 8


def test_closed_store_refuses_calls(pages):
    store = TieredStore([CpuTier(capacity_bytes=1 << 20, pin_memory=False)])
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreClosed):
        store.lookup(NS, pages.tokens(4))
    with pytest.raises(InvalidConfig, match="at least one tier"):
        TieredStore([])


def test_lru_order_and_eviction_exact(pages):
    tier = CpuTier(capacity_bytes=3 * PAGE_BLOB_NBYTES, pin_memory=False)
    store = TieredStore([tier])
    prompts = [pages.tokens(4, offset=i) for i in range(4)]
    keys = [NS.page_keys(p)[0] for p in prompts]
    for p in prompts[:3]:
        assert store.put(NS, p, pages.payloads(NS, 1)) == 1
    assert tier.keys_lru_order() == keys[:3]
    assert store.get_closest(NS, prompts[0]) is not None  # a hit refreshes recency
    assert tier.keys_lru_order() == [keys[1], keys[2], keys[0]]
    assert store.lookup(NS, prompts[1]).num_tokens == 4  # metadata: no recency change
    assert tier.keys_lru_order() == [keys[1], keys[2], keys[0]]
    store.put(NS, prompts[3], pages.payloads(NS, 1))  # evicts the oldest: prompt 1
    assert tier.keys_lru_order() == [keys[2], keys[0], keys[3]]
    s = tier.stats()
    assert (s.num_pages, s.used_bytes, s.evictions) == (3, 3 * PAGE_BLOB_NBYTES, 1)
    assert store.get_closest(NS, prompts[1]) is None


def test_page_larger_than_tier_is_not_stored(pages):
    store = TieredStore([CpuTier(capacity_bytes=PAGE_BLOB_NBYTES - 1, pin_memory=False)])
    tokens = pages.tokens(4)
    assert store.put(NS, tokens, pages.payloads(NS, 1)) == 0
    assert store.get_closest(NS, tokens) is None


def test_sixteen_threads_put_and_get_nothing_mixed(store, pages):
    num_threads, num_rounds = 16, 20
    # Prompts share their first page within a thread (prefix reuse), second pages all differ.
    prompts = [[pages.tokens(4, offset=t) + pages.tokens(4, offset=100 + 1000 * t + r)
                for r in range(num_rounds)] for t in range(num_threads)]
    first_payloads = [pages.payloads(NS, 1, offset=t) for t in range(num_threads)]
    errors: list[str] = []

    def worker(t: int) -> None:
        for r, tokens in enumerate(prompts[t]):
            payloads = first_payloads[t] + pages.payloads(NS, 1, offset=100 + 1000 * t + r)
            store.put(NS, tokens, payloads)
            got = store.get_closest(NS, tokens)
            # Other threads may evict these pages (64-page tier), but what comes back is ours.
            if got is not None and [bytes(p) for p in got.payloads] != payloads[: got.num_tokens
                                                                                // 4]:
                errors.append(f"thread {t} round {r}: wrong payload")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    s = store.stats()[0]
    assert s.num_pages <= 64 and s.used_bytes == s.num_pages * PAGE_BLOB_NBYTES
