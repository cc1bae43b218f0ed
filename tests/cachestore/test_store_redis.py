"""TieredStore over a real redis-server (single node and a 3-master cluster) started by the
fixtures in tests/conftest.py: round trips, corruption, TTL, outages, demotion/promotion."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis
from redis.cluster import RedisCluster

from kvmesh.cachestore.codec import encode_page, header_nbytes
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.cachestore.tiers.redis import RedisTier, parse_url

NS = Namespace("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
               page_size=4)
BLOB = header_nbytes(4) + NS.page_nbytes
PREFIX = b"kvmesh:"


def test_url_schemes():
    assert parse_url("redis://h:1/0") == ("redis://h:1/0", False)
    assert parse_url("redis://h:1/0", cluster=True) == ("redis://h:1/0", True)
    assert parse_url("redis+cluster://h:1") == ("redis://h:1", True)
    assert parse_url("rediss+cluster://h:1") == ("rediss://h:1", True)
    with pytest.raises(InvalidConfig, match="scheme"):
        parse_url("http://h:1")
    with pytest.raises(InvalidConfig, match="ttl_seconds"):
        RedisTier("redis://h:1", ttl_seconds=0)


def test_single_server_round_trip_gap_and_delete(redis_server, pages):
    tier = RedisTier(redis_server.url)
    store = TieredStore([tier])
    tokens = pages.tokens(22)
    payloads = pages.payloads(NS, 5)
    assert store.put(NS, tokens, payloads) == 5
    assert store.put(NS, tokens, payloads) == 0
    raw = redis.Redis.from_url(redis_server.url)
    keys = NS.page_keys(tokens)
    assert raw.dbsize() == 5 and raw.strlen(PREFIX + keys[0]) == BLOB
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 20 and got.tiers == ["redis"] * 5
    assert [bytes(p) for p in got.payloads] == payloads
    assert store.delete(NS, tokens, [1]) == 1
    assert not raw.exists(PREFIX + keys[1])
    assert store.get_closest(NS, tokens).num_tokens == 4
    assert store.lookup(NS, tokens).tiers == ["redis"]
    s = store.stats()[0]
    assert (s.name, s.num_pages, s.hits, s.errors, s.is_available) == ("redis", 4, 6, 0, True)
    assert s.used_bytes > 4 * BLOB
    store.close()


@pytest.mark.parametrize("offset", [3, 30, header_nbytes(4) + 1, BLOB - 1])
def test_flipped_byte_in_redis_value_is_a_miss_and_dropped(redis_server, pages, offset):
    store = TieredStore([RedisTier(redis_server.url)])
    tokens = pages.tokens(12)
    payloads = pages.payloads(NS, 3)
    store.put(NS, tokens, payloads)
    raw = redis.Redis.from_url(redis_server.url)
    key1 = PREFIX + NS.page_keys(tokens)[1]
    value = bytearray(raw.get(key1))
    value[offset] ^= 0x04
    raw.set(key1, bytes(value))
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 4 and bytes(got.payloads[0]) == payloads[0]
    assert not raw.exists(key1)
    assert store.stats()[0].errors == 1


def test_collision_in_redis_is_a_miss(redis_server, pages):
    tier = RedisTier(redis_server.url)
    store = TieredStore([tier])
    tokens = pages.tokens(4)
    key = NS.page_keys(tokens)[0]
    other = tokens_to_bytes(pages.tokens(4, offset=9))
    tier.put_many([(key, encode_page(NS, key, other, pages.payloads(NS, 1)[0]))])
    assert store.get_closest(NS, tokens) is None
    assert tier.contains_many([key]) == [False]


def test_ttl_is_set_and_refreshed_on_hit(redis_server, pages):
    store = TieredStore([RedisTier(redis_server.url, ttl_seconds=100)])
    tokens = pages.tokens(4)
    store.put(NS, tokens, pages.payloads(NS, 1))
    raw = redis.Redis.from_url(redis_server.url)
    key = PREFIX + NS.page_keys(tokens)[0]
    assert 0 < raw.ttl(key) <= 100
    raw.expire(key, 5)
    assert store.get_closest(NS, tokens).num_tokens == 4
    assert raw.ttl(key) > 5  # GETEX refreshed it


def test_kill_redis_mid_test_degrades_to_miss_then_recovers(redis_server, pages):
    tier = RedisTier(redis_server.url, retry_after_s=1.0)
    store = TieredStore([CpuTier(capacity_bytes=2 * BLOB, pin_memory=False), tier])
    tokens = pages.tokens(16)
    payloads = pages.payloads(NS, 4)
    assert store.put(NS, tokens, payloads) == 4  # 2 in cpu, 2 demoted to redis
    assert store.lookup(NS, tokens).tiers == ["redis"] * 2 + ["cpu"] * 2
    redis_server.kill()
    assert store.get_closest(NS, tokens) is None  # pages 0-1 were only in redis
    assert store.lookup(NS, tokens).num_tokens == 0
    other = pages.tokens(12, offset=5)
    # 3 pages into a 2-page CPU tier: page 0 is demoted into the void (not counted), and so are
    # the CPU tier's earlier pages.
    assert store.put(NS, other, pages.payloads(NS, 3, offset=5)) == 2
    assert store.get_closest(NS, other) is None
    assert store.delete(NS, other) == 2  # what the CPU tier holds
    s_cpu, s_redis = store.stats()
    assert s_cpu.is_available and s_cpu.errors == 0
    assert not s_redis.is_available and s_redis.errors >= 4
    with pytest.raises(Exception, match="failed recently"):  # fast path while backing off
        tier.contains_many([b"\0" * 16])

    redis_server.start()  # same port, empty
    time.sleep(1.1)
    assert store.put(NS, tokens, payloads) == 4
    assert store.lookup(NS, tokens).tiers == ["redis"] * 2 + ["cpu"] * 2
    assert store.stats()[1].is_available


def test_redis_down_at_start_is_a_miss(pages):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}"
    store = TieredStore([RedisTier(url)])
    tokens = pages.tokens(8)
    assert store.put(NS, tokens, pages.payloads(NS, 2)) == 0
    assert store.get_closest(NS, tokens) is None
    assert store.lookup(NS, tokens).num_tokens == 0
    assert not store.stats()[0].is_available


def test_demotion_cpu_to_redis_and_promotion_back(redis_server, pages):
    cpu = CpuTier(capacity_bytes=2 * BLOB, pin_memory=False)
    store = TieredStore([cpu, RedisTier(redis_server.url)])
    tokens = pages.tokens(16)
    payloads = pages.payloads(NS, 4)
    keys = NS.page_keys(tokens)
    assert store.put(NS, tokens, payloads) == 4
    raw = redis.Redis.from_url(redis_server.url)
    assert sorted(raw.keys()) == sorted(PREFIX + k for k in keys[:2])
    assert cpu.keys_lru_order() == keys[2:]
    got = store.get_closest(NS, tokens)
    assert got.tiers == ["redis", "redis", "cpu", "cpu"]
    assert [bytes(p) for p in got.payloads] == payloads
    assert cpu.keys_lru_order() == keys[:2]  # promoted
    assert sorted(raw.keys()) == sorted(PREFIX + k for k in keys)  # pushed-out pages demoted
    assert store.lookup(NS, tokens).tiers == ["cpu", "cpu", "redis", "redis"]


def test_cluster_round_trip_spreads_pages_over_masters(redis_cluster, pages):
    tier = RedisTier(redis_cluster.url)
    assert tier.is_cluster
    store = TieredStore([tier])
    tokens = pages.tokens(4 * 24)
    payloads = pages.payloads(NS, 24)
    assert store.put(NS, tokens, payloads) == 24
    assert store.put(NS, tokens, payloads) == 0
    per_node = [redis.Redis(port=n.port).dbsize() for n in redis_cluster.nodes]
    assert sum(per_node) == 24 and sum(n > 0 for n in per_node) >= 2
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 96 and [bytes(p) for p in got.payloads] == payloads
    assert store.delete(NS, tokens, [10]) == 1
    assert store.lookup(NS, tokens).num_tokens == 40
    s = store.stats()[0]
    assert (s.num_pages, s.is_available, s.errors) == (23, True, 0)
    assert s.used_bytes > 23 * BLOB and s.capacity_bytes == 0  # summed over masters; no maxmemory
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    assert client.strlen(PREFIX + NS.page_keys(tokens)[0]) == BLOB
    # TTL and GETEX refresh work across nodes too (another prefix on the same cluster)
    ttl_store = TieredStore([RedisTier(redis_cluster.url, ttl_seconds=100, key_prefix="ttl:")])
    assert ttl_store.put(NS, tokens[:40], payloads[:10]) == 10
    ttl_keys = [b"ttl:" + k for k in NS.page_keys(tokens[:40])]
    assert all(0 < client.ttl(k) <= 100 for k in ttl_keys)
    for k in ttl_keys:
        client.expire(k, 5)
    assert ttl_store.get_closest(NS, tokens[:40]).num_tokens == 40
    assert all(client.ttl(k) > 5 for k in ttl_keys)
    client.close()
    store.close()
    ttl_store.close()


def test_cluster_master_down_degrades_to_miss(redis_cluster, pages):
    store = TieredStore([RedisTier(redis_cluster.url)])
    tokens = pages.tokens(4 * 24)  # spread over all three masters
    assert store.put(NS, tokens, pages.payloads(NS, 24)) == 24
    redis_cluster.nodes[1].kill()  # no replicas: its slots are gone
    for _ in range(3):  # the first call finds the dead node, the next ones back off
        assert store.get_closest(NS, tokens) is None
        assert store.lookup(NS, tokens).num_tokens == 0
        assert store.put(NS, pages.tokens(8, offset=1), pages.payloads(NS, 2)) == 0
    assert not store.stats()[0].is_available
    redis_cluster.kill()
    assert store.get_closest(NS, tokens) is None


def test_sixteen_threads_over_cpu_and_redis(redis_server, pages):
    store = TieredStore([CpuTier(capacity_bytes=8 * BLOB, pin_memory=False),
                         RedisTier(redis_server.url)])
    prompts = [pages.tokens(12, offset=t) for t in range(16)]
    expected = [pages.payloads(NS, 3, offset=t) for t in range(16)]
    errors: list[str] = []

    def worker(t: int) -> None:
        for _ in range(5):
            store.put(NS, prompts[t], expected[t])
            got = store.get_closest(NS, prompts[t])
            # A page in flight between tiers (evicted from CPU by another thread, its SET to
            # Redis not done yet) may be a transient miss; what comes back is always ours.
            num_pages = 0 if got is None else got.num_tokens // NS.page_size
            if got is not None and [bytes(p) for p in got.payloads] != expected[t][:num_pages]:
                errors.append(f"thread {t}: wrong payloads")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for t in range(16):  # every page is still somewhere, intact
        got = store.get_closest(NS, prompts[t])
        assert [bytes(p) for p in got.payloads] == expected[t]


def test_page_in_flight_to_a_slow_redis_is_still_found(redis_server, pages):
    """CLIENT PAUSE WRITE holds the demotion SETs; meanwhile the demoted pages are served from
    the in-flight registry instead of being a miss."""
    cpu = CpuTier(capacity_bytes=2 * BLOB, pin_memory=False)
    store = TieredStore([cpu, RedisTier(redis_server.url, socket_timeout_s=5.0)])
    first, second = pages.tokens(8, offset=1), pages.tokens(8, offset=2)
    first_payloads = pages.payloads(NS, 2, offset=1)
    store.put(NS, first, first_payloads)
    raw = redis.Redis.from_url(redis_server.url)
    raw.execute_command("CLIENT", "PAUSE", "1500", "WRITE")  # long: loaded CI
    putter = threading.Thread(target=store.put, args=(NS, second, pages.payloads(NS, 2, 2)))
    putter.start()
    deadline = time.monotonic() + 5
    while cpu.contains_many(NS.page_keys(first)) != [False, False]:  # evicted, SET pending
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert raw.dbsize() == 0  # not in Redis yet
    assert store.lookup(NS, first).tiers == ["cpu", "cpu"]
    got = store.get_closest(NS, first)
    assert [bytes(p) for p in got.payloads] == first_payloads
    putter.join()
    assert store.lookup(NS, first).num_tokens == 8 and store.lookup(NS, second).num_tokens == 8
