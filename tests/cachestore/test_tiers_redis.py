"""RedisTier on its own against real redis-server processes: batches, NX, OOM, fast failure."""

from __future__ import annotations

import time

import pytest
import redis

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.base import TierFull, TierUnavailable
from kvmesh.cachestore.tiers.redis import RedisTier


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_batch_ops_prefix_and_first_write_wins(redis_server):
    tier = RedisTier(redis_server.url, key_prefix="t1:")
    assert tier.put_many([(key(1), b"one"), (key(2), b"two")]) == []
    assert tier.put_many([(key(1), b"changed")]) == []
    assert tier.contains_many([key(1), key(2), key(3)]) == [True, True, False]
    assert tier.get_many([key(2), key(3), key(1)]) == [b"two", None, b"one"]
    raw = redis.Redis.from_url(redis_server.url)
    assert sorted(raw.keys()) == [b"t1:" + key(1), b"t1:" + key(2)]
    assert RedisTier(redis_server.url, key_prefix="t2:").contains_many([key(1)]) == [False]
    assert tier.delete_many([key(1), key(3)]) == 1
    assert tier.contains_many([]) == [] and tier.get_many([]) == [] and tier.delete_many([]) == 0
    s = tier.stats()
    assert (s.name, s.hits, s.misses, s.num_pages, s.is_available) == ("redis", 2, 1, 1, True)
    tier.close()


def test_maxmemory_reported_and_oom_degrades(redis_factory, pages):
    server = redis_factory("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    tier = RedisTier(server.url)
    s = tier.stats()
    assert s.capacity_bytes == 2 * 1024 * 1024 and 0 < s.used_bytes < s.capacity_bytes
    big = b"x" * (256 * 1024)
    num_stored = 0
    with pytest.raises(TierFull, match="refused every write"):
        for i in range(16):  # 4 MiB into 2 MiB: Redis refuses before the end
            tier.put_many([(key(i), big)])
            num_stored += 1
    assert 0 < num_stored < 8
    assert tier.contains_many([key(i) for i in range(num_stored + 1)]) == [True] * num_stored + [
        False]
    assert tier.stats().errors == 1
    redis.Redis.from_url(server.url).config_set("maxmemory", 1)  # refuse every write from now
    ns = Namespace("m", num_layers=4, num_kv_heads=4, head_dim=64, dtype="float32", page_size=16)
    store = TieredStore([tier])
    tokens = pages.tokens(32)
    assert store.put(ns, tokens, pages.payloads(ns, 2)) == 0  # full: stored nowhere, no raise
    assert store.get_closest(ns, tokens) is None
    assert store.stats()[0].is_available  # full is not down


def test_failure_backs_off_then_reconnects(redis_server):
    tier = RedisTier(redis_server.url, retry_after_s=0.5)
    tier.put_many([(key(1), b"v")])
    redis_server.kill()
    with pytest.raises(TierUnavailable, match="unreachable"):
        tier.get_many([key(1)])
    with pytest.raises(TierUnavailable, match="failed recently"):
        tier.contains_many([key(1)])
    assert not tier.stats().is_available
    redis_server.start()
    time.sleep(0.55)
    assert tier.contains_many([key(1)]) == [False]  # a fresh, empty server
    assert tier.stats().is_available


def test_unroutable_host_fails_fast():
    tier = RedisTier("redis://10.255.255.1:6399/0")  # nothing answers there
    started = time.monotonic()
    with pytest.raises(TierUnavailable):
        tier.get_many([key(1)])
    with pytest.raises(TierUnavailable):
        tier.put_many([(key(1), b"v")])
    assert time.monotonic() - started < 3.0  # 0.5 s connect timeout, then backing off
