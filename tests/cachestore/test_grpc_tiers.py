"""Store servers with more than the CPU tier, over real gRPC: 32 concurrent clients, the disk tier
across a restart, Redis below CPU, and RemoteTier composing two servers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.codec import decode_page, encode_page
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.rpc.server import serve_store

NS = Namespace("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, page_size=4)
PAGE = NS.page_nbytes  # 2 x 2 x 4 x 2 x 8 x 2 = 512 bytes


def kv_for(tokens: list[int]) -> torch.Tensor:
    """KV whose bits are a function of each token id, so a shared prefix has shared KV."""
    t = torch.tensor(tokens, dtype=torch.int64).view(1, 1, -1, 1, 1)
    bits = (t * 7919 + torch.arange(2 * 2 * 2 * 8).view(2, 2, 1, 2, 8)) % 65521
    return bits.to(torch.int16).view(torch.bfloat16).contiguous()


def bits(kv: torch.Tensor) -> bytes:
    return kv.contiguous().view(torch.uint8).numpy().tobytes()


def test_32_concurrent_clients_distinct_and_shared_prefixes():
    shared = list(range(10_000, 10_032))  # 8 pages every client also puts
    errors: list[BaseException] = []
    with serve_store(StoreConfig(port=0, cpu_bytes=64 << 20, max_workers=48)) as server:
        barrier = threading.Barrier(32)

        def client_thread(i: int) -> None:
            try:
                own = shared + [i * 1000 + j for j in range(40)]  # 72 tokens = 18 pages
                with StoreClient(server.target) as client:
                    barrier.wait(timeout=30)
                    for _ in range(3):
                        client.put(own, kv_for(own), NS)
                        got = client.get_closest(own, NS)
                        assert got.num_tokens == 72 and bits(got.kv) == bits(kv_for(own))
                        raw = client.get_closest_pages(NS, shared)
                        assert raw.num_tokens == 32
                        assert b"".join(raw.payloads) == b"".join(
                            bits(kv_for(shared)[:, :, 4 * p : 4 * p + 4]) for p in range(8))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:3]
        with StoreClient(server.target) as client:
            (cpu,) = client.stats()
            assert cpu.num_pages == 8 + 32 * 10  # shared pages stored once, nothing lost
            for i in range(32):
                own = shared + [i * 1000 + j for j in range(40)]
                assert client.lookup(own, NS).num_tokens == 72


def test_disk_tier_survives_a_restart(tmp_path):
    tokens = list(range(64))
    config = StoreConfig(port=0, cpu_bytes=4 * PAGE, disk_dir=str(tmp_path / "pages"),
                         disk_bytes=1 << 20)
    with serve_store(config) as server, StoreClient(server.target) as client:
        assert client.put(tokens, kv_for(tokens), NS) == 16
        cpu, disk = client.stats()
        # encoded pages are a bit over PAGE: the CPU tier keeps the 3 newest, the rest went down
        assert (cpu.name, cpu.num_pages, disk.name, disk.num_pages) == ("cpu", 3, "disk", 13)
    with serve_store(config) as server, StoreClient(server.target) as client:
        got = client.get_closest(tokens, NS)  # the CPU tier starts empty, the disk tier not
        assert got.num_tokens == 52 and got.tiers == ["disk"] * 13
        assert bits(got.kv) == bits(kv_for(tokens)[:, :, :52])
        cpu, disk = client.stats()
        assert (cpu.num_pages, disk.num_pages) == (3, 13)  # hits promoted; CPU holds 3


def test_redis_tier_below_cpu(redis_server):
    tokens = list(range(40))  # 10 pages, the CPU tier holds 3
    config = StoreConfig(port=0, cpu_bytes=3 * PAGE + 300, redis_url=redis_server.url)
    with serve_store(config) as server, StoreClient(server.target) as client:
        assert client.put(tokens, kv_for(tokens), NS) == 10
        assert set(client.lookup(tokens, NS).tiers) == {"cpu", "redis"}
        got = client.get_closest(tokens, NS)
        assert got.num_tokens == 40 and bits(got.kv) == bits(kv_for(tokens))
        redis_server.kill()  # a tier going down is a miss, never a failed call
        got = client.get_closest(tokens, NS)
        assert got is None or bits(got.kv) == bits(kv_for(tokens)[:, :, : got.num_tokens])
        assert {s.name: s.is_available for s in client.stats()}["redis"] is False


@pytest.fixture
def backend():
    with serve_store(StoreConfig(port=0, cpu_bytes=16 << 20, token="back")) as server:
        yield server


def test_remote_tier_composes_two_servers(backend):
    front_config = StoreConfig(port=0, cpu_bytes=4 * PAGE + 500, remote=backend.target,
                               remote_token="back")
    tokens = list(range(100, 140))  # 10 pages; the front CPU tier keeps 4
    with serve_store(front_config) as front, StoreClient(front.target) as client, \
            StoreClient(backend.target, token="back") as direct:
        assert client.put(tokens, kv_for(tokens), NS) == 10
        tiers = client.lookup(tokens, NS).tiers
        assert tiers.count("remote") == 6 and tiers.count("cpu") == 4
        # the backend holds the demoted pages under the same keys: its own API sees them
        keys = NS.page_keys(tokens)
        assert sum(direct.has_pages(keys)) == 6
        got = client.get_closest(tokens, NS)
        assert got.num_tokens == 40 and bits(got.kv) == bits(kv_for(tokens))
        assert "remote" in got.tiers
        remote_stats = {s.name: s for s in client.stats()}["remote"]
        assert remote_stats.is_available and remote_stats.hits >= 1
        # what the backend holds are the front's encoded pages, verifiable against the namespace
        token_bytes = np.asarray(tokens, dtype="<i4").tobytes()
        held = direct.get_pages(keys)
        for i, blob in enumerate(held):
            if blob is not None:
                payload = decode_page(blob, NS, keys[i], token_bytes[16 * i : 16 * i + 16])
                assert bytes(payload) == bits(kv_for(tokens)[:, :, 4 * i : 4 * i + 4])


def test_remote_tier_down_is_a_miss(backend):
    tokens = list(range(40))
    config = StoreConfig(port=0, cpu_bytes=2 * PAGE + 300, remote=backend.target,
                         remote_token="back")
    with serve_store(config) as front, StoreClient(front.target) as client:
        client.put(tokens, kv_for(tokens), NS)
        backend.stop(grace=0)
        got = client.get_closest(tokens, NS)  # CPU holds the last 2 pages only: page 0 missing
        assert got is None
        assert client.lookup(tokens, NS).num_tokens == 0
        remote = {s.name: s for s in client.stats()}["remote"]
        assert remote.is_available is False and remote.errors >= 1
        shorter = [7, 8, 9, 10]
        assert client.put(shorter, kv_for(shorter), NS) == 1  # puts still work, into CPU
        assert client.get_closest(shorter, NS).tiers == ["cpu"]


def test_a_bad_page_from_the_remote_is_a_miss_and_dropped(backend):
    """The backend checks key and checksum; the front still verifies namespace and tokens, so a
    page whose tokens differ (a collision) is never returned and is deleted from the remote."""
    tokens = list(range(200, 208))  # 2 pages
    keys = NS.page_keys(tokens)
    wrong_tokens = np.arange(900, 904, dtype="<i4").tobytes()
    impostor = encode_page(NS, keys[0], wrong_tokens, bytes(PAGE))  # right key, other tokens
    with StoreClient(backend.target, token="back") as direct:
        assert direct.put_encoded_pages([(keys[0], impostor)]) == 1
        config = StoreConfig(port=0, cpu_bytes=1 << 20, remote=backend.target,
                             remote_token="back")
        with serve_store(config) as front, StoreClient(front.target) as client:
            assert client.lookup(tokens, NS).tiers == ["remote"]  # metadata: present
            assert client.get_closest(tokens, NS) is None  # verified: a miss
            assert direct.has_pages([keys[0]]) == [False]  # and dropped from the remote
            remote = {s.name: s for s in client.stats()}["remote"]
            assert remote.errors == 1 and remote.is_available


def test_remote_tier_fails_fast_while_down_then_retries():
    from kvmesh.cachestore.client.store_client import StoreClient
    from kvmesh.cachestore.tiers.base import TierUnavailable
    from kvmesh.cachestore.tiers.remote import RemoteTier

    backend = serve_store(StoreConfig(port=0, cpu_bytes=1 << 20))
    port = backend.port
    tier = RemoteTier(StoreClient(backend.target, timeout=5.0, breaker=None), retry_after_s=1.0)
    key = NS.page_keys(list(range(4)))[0]
    try:
        assert tier.contains_many([key]) == [False]
        backend.stop(grace=0)
        with pytest.raises(TierUnavailable, match=f"remote store 127.0.0.1:{port}"):
            tier.contains_many([key])
        backend = serve_store(StoreConfig(port=port, cpu_bytes=1 << 20))  # back, same port
        with pytest.raises(TierUnavailable, match="is down; next try in at most 1.0 s"):
            tier.get_many([key])  # inside the window: no call is made
        # past the window the tier calls again; its channel may still be in gRPC's reconnect
        # backoff (about 1 s plus jitter), which reads as down for one more window
        deadline = time.monotonic() + 15
        while True:
            time.sleep(1.1)
            try:
                found = tier.contains_many([key])
                break
            except TierUnavailable:
                assert time.monotonic() < deadline, "the remote tier never came back"
        assert found == [False] and tier.get_many([key]) == [None]
        assert tier.stats().errors >= 1 and tier.stats().is_available
    finally:
        tier.close()
        backend.stop(grace=0)
