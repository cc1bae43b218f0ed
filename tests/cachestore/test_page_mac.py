"""Keyed page MACs on the shared tiers (issue 22, item 12): a page forged in Redis or on disk with
a valid xxh3 checksum passes without a MAC key and is a miss, dropped and counted with one; a
store restarted with another key misses every old page, never fails. Real redis-server (fixture
in tests/conftest.py), real files, and one real gRPC store server."""

from __future__ import annotations

import logging

import pytest
import redis
import torch

from kvmesh.cachestore import StoreClient
from kvmesh.cachestore.codec import encode_page, header_nbytes
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.cachestore.page_mac import TRAILER_NBYTES, PageMac
from kvmesh.cachestore.rpc.server import build_tiers, serve_store
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.disk import DiskTier
from kvmesh.cachestore.tiers.redis import RedisTier

NS = Namespace("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
               page_size=4)
BLOB = header_nbytes(4) + NS.page_nbytes
PREFIX = b"kvmesh:"
KEY_A = b"deployment secret number one"
KEY_B = b"deployment secret number two"


def forged(tokens: list[int], index: int, stored: bytes, payload: bytes) -> bytes:
    """Page `index` of `tokens` re-encoded with other KV bytes (a valid header and xxh3
    checksum), keeping whatever trailer the stored value had: what a writer without the key
    can make."""
    key = NS.page_keys(tokens)[index]
    page_tokens = tokens_to_bytes(tokens[4 * index : 4 * index + 4])
    return encode_page(NS, key, page_tokens, payload) + stored[BLOB:]


def test_mac_seals_opens_and_rejects():
    mac = PageMac(KEY_A)
    page = b"x" * 1000
    trailer = mac.trailer(page)
    assert len(trailer) == TRAILER_NBYTES and mac.trailer(page) != trailer  # fresh nonce
    assert bytes(mac.open(page + trailer)) == page
    assert PageMac(KEY_B).open(page + trailer) is None
    assert mac.open(b"y" + page[1:] + trailer) is None
    assert mac.open(page + trailer[:-1] + bytes([trailer[-1] ^ 1])) is None
    assert mac.open(trailer) is None and mac.open(b"") is None
    with pytest.raises(InvalidConfig, match="at least 16"):
        PageMac(b"short")
    assert "deployment" not in repr(mac)


@pytest.mark.parametrize("mac_key", [None, KEY_A])
def test_page_forged_in_redis(redis_server, pages, mac_key):
    tier = RedisTier(redis_server.url, mac_key=mac_key)
    store = TieredStore([tier])
    tokens = pages.tokens(12)
    payloads = pages.payloads(NS, 3)
    assert store.put(NS, tokens, payloads) == 3
    raw = redis.Redis.from_url(redis_server.url)
    key1 = PREFIX + NS.page_keys(tokens)[1]
    stored = raw.get(key1)
    assert len(stored) == BLOB + (TRAILER_NBYTES if mac_key else 0)
    evil = pages.payloads(NS, 1, offset=99)[0]
    raw.set(key1, forged(tokens, 1, stored, evil))
    got = store.get_closest(NS, tokens)
    stats = store.stats()[0]
    if mac_key is None:  # the checksum alone lets the forgery through
        assert got.num_tokens == 12 and bytes(got.payloads[1]) == evil
        assert (stats.errors, stats.num_forged) == (0, 0)
    else:
        assert got.num_tokens == 4 and bytes(got.payloads[0]) == payloads[0]
        assert not raw.exists(key1)
        assert (stats.errors, stats.num_forged, stats.hits) == (1, 1, 2)  # 3 read, 1 forged
        assert store.put(NS, tokens, payloads) == 1  # the honest page is stored again
        assert [bytes(p) for p in store.get_closest(NS, tokens).payloads] == payloads
    store.close()


def test_redis_restart_with_another_key_misses_every_old_page(redis_server, pages):
    tokens = pages.tokens(12)
    payloads = pages.payloads(NS, 3)
    TieredStore([RedisTier(redis_server.url, mac_key=KEY_A)]).put(NS, tokens, payloads)
    tier = RedisTier(redis_server.url, mac_key=KEY_B)
    store = TieredStore([tier])
    assert store.get_closest(NS, tokens) is None
    assert tier.get_many(NS.page_keys(tokens)) == [None] * 3  # all read once and dropped
    assert redis.Redis.from_url(redis_server.url).dbsize() == 0
    stats = store.stats()[0]
    assert (stats.num_forged, stats.hits, stats.is_available) == (3, 0, True)
    assert store.put(NS, tokens, payloads) == 3  # and the new key's pages work
    assert [bytes(p) for p in store.get_closest(NS, tokens).payloads] == payloads


@pytest.mark.parametrize("mac_key", [None, KEY_A])
def test_page_forged_on_disk(tmp_path, pages, mac_key):
    tier = DiskTier(tmp_path, capacity_bytes=100 * BLOB, mac_key=mac_key)
    store = TieredStore([tier])
    tokens = pages.tokens(12)
    payloads = pages.payloads(NS, 3)
    assert store.put(NS, tokens, payloads) == 3
    path = tier.path_of(NS.page_keys(tokens)[1])
    stored = path.read_bytes()
    evil = pages.payloads(NS, 1, offset=99)[0]
    path.write_bytes(forged(tokens, 1, stored, evil))
    got = store.get_closest(NS, tokens)
    stats = store.stats()[0]
    if mac_key is None:
        assert got.num_tokens == 12 and bytes(got.payloads[1]) == evil
        assert (stats.errors, stats.num_forged) == (0, 0)
    else:
        assert got.num_tokens == 4 and bytes(got.payloads[0]) == payloads[0]
        assert not path.exists()
        assert (stats.errors, stats.num_forged, stats.num_pages) == (1, 1, 2)


def test_disk_restart_with_another_key_or_none(tmp_path, pages):
    tokens = pages.tokens(12)
    payloads = pages.payloads(NS, 3)
    TieredStore([DiskTier(tmp_path, 100 * BLOB, mac_key=KEY_A)]).put(NS, tokens, payloads)
    reopened = DiskTier(tmp_path, 100 * BLOB, mac_key=KEY_A)  # headers still index the pages
    assert reopened.num_dropped_at_start == 0 and reopened.stats().num_pages == 3
    assert [bytes(p) for p in TieredStore([reopened]).get_closest(NS, tokens).payloads] == payloads
    other = DiskTier(tmp_path, 100 * BLOB, mac_key=KEY_B)
    assert other.stats().num_pages == 3  # kept until read: the rebuild reads headers only
    assert TieredStore([other]).get_closest(NS, tokens) is None
    assert other.get_many(NS.page_keys(tokens)) == [None, None, None]
    assert (other.stats().num_forged, other.stats().num_pages) == (3, 0)
    assert not list(tmp_path.glob("*/*.page"))
    # sealed files under a tier without a key (and bare ones under a keyed tier) are dropped
    TieredStore([DiskTier(tmp_path, 100 * BLOB, mac_key=KEY_A)]).put(NS, tokens, payloads)
    assert DiskTier(tmp_path, 100 * BLOB).num_dropped_at_start == 3
    TieredStore([DiskTier(tmp_path, 100 * BLOB)]).put(NS, tokens, payloads)
    assert DiskTier(tmp_path, 100 * BLOB, mac_key=KEY_A).num_dropped_at_start == 3


def test_disk_evictions_are_opened_before_demotion(tmp_path, pages):
    tier = DiskTier(tmp_path, capacity_bytes=2 * (BLOB + TRAILER_NBYTES), mac_key=KEY_A)
    tokens = pages.tokens(12)
    payloads = pages.payloads(NS, 3)
    keys = NS.page_keys(tokens)
    encoded = [encode_page(NS, keys[i], tokens_to_bytes(tokens[4 * i : 4 * i + 4]), payloads[i])
               for i in range(3)]
    assert tier.put_many([(keys[0], encoded[0]), (keys[1], encoded[1])]) == []
    path = tier.path_of(keys[1])
    path.write_bytes(forged(tokens, 1, path.read_bytes(), payloads[2]))
    evicted = tier.put_many([(keys[2], encoded[2])])
    assert [(key, bytes(blob)) for key, blob in evicted] == [(keys[0], encoded[0])]  # bare page
    evicted = tier.put_many([(keys[0], encoded[0])])  # evicts the forged page 1: not demoted
    assert evicted == [] and tier.stats().num_forged == 1 and not path.exists()


def test_config_and_warning(tmp_path, redis_server, caplog):
    key_file = tmp_path / "redis.key"
    key_file.write_bytes(KEY_A + b"\n")
    config = StoreConfig.from_sources(
        {"redis_mac_key_file": str(key_file)},
        env={"KVMESH_STORE_DISK_MAC_KEY": KEY_B.decode()})
    assert config.disk_mac_key == KEY_B.decode() and KEY_B.decode() not in repr(config)
    with pytest.raises(InvalidConfig, match="not both"):
        StoreConfig(redis_mac_key=KEY_A.decode(), redis_mac_key_file=str(key_file))
    with pytest.raises(InvalidConfig, match="at least 16"):
        StoreConfig.from_sources(env={"KVMESH_STORE_REDIS_MAC_KEY": "short"})
    with pytest.raises(InvalidConfig, match="not a file"):
        StoreConfig(disk_mac_key_file=str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger="kvmesh.cachestore.rpc.server"):
        tiers = build_tiers(StoreConfig(redis_url=redis_server.url,
                                        redis_mac_key_file=str(key_file)))
        assert "forgeable" not in caplog.text
        build_tiers(StoreConfig(redis_url=redis_server.url))
        assert "pages in Redis are forgeable by anyone who can write it" in caplog.text
    redis_tier = tiers[-1]
    redis_tier.put_many([(b"k" * 16, b"page")])
    sealed = redis.Redis.from_url(redis_server.url).get(PREFIX + b"k" * 16)
    assert bytes(PageMac(KEY_A).open(sealed)) == b"page"  # the file's key, newline stripped


def test_store_server_drops_a_forged_redis_page(tmp_path, redis_server):
    """Over gRPC: the CPU tier holds nothing (too small), so every page comes from Redis."""
    key_file = tmp_path / "redis.key"
    key_file.write_bytes(KEY_A)
    ns = Namespace("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16,
                   page_size=4)
    tokens = list(range(12))
    kv = torch.arange(2 * 2 * 12 * 2 * 8, dtype=torch.float16).view(2, 2, 12, 2, 8)
    config = StoreConfig(port=0, cpu_bytes=100, redis_url=redis_server.url,
                         redis_mac_key_file=str(key_file))
    with serve_store(config) as server, StoreClient(server.target) as client:
        assert client.put(tokens, kv, ns) == 3
        raw = redis.Redis.from_url(redis_server.url)
        key1 = PREFIX + ns.page_keys(tokens)[1]
        stored = raw.get(key1)
        page_tokens = tokens_to_bytes(tokens[4:8])
        raw.set(key1, encode_page(ns, ns.page_keys(tokens)[1], page_tokens,
                                  bytes(ns.page_nbytes)) + stored[-TRAILER_NBYTES:])
        got = client.get_closest(tokens, ns)
        assert got.num_tokens == 4 and torch.equal(got.kv, kv[:, :, :4])
        assert not raw.exists(key1)
        assert {s.name: s.errors for s in client.stats()}["redis"] == 1
