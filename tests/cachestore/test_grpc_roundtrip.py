"""KVStore over real gRPC on a random loopback port: tensor and raw-page round trips (incl. > 4 MiB
per request and pages larger than a frame), gaps, key-level page RPCs, stats, health."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.cachestore import ClosestKV, Namespace
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.rpc.server import serve_store

SMALL = Namespace("test-model", num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16,
                  page_size=4)


@pytest.fixture
def server():  # `client` (conftest) connects to it
    srv = serve_store(StoreConfig(port=0, cpu_bytes=256 << 20))
    yield srv
    srv.stop(grace=0)


def random_kv(ns: Namespace, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """[L, 2, T, H, D] with random bits in every byte (any dtype, incl. float8)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (ns.num_layers, 2, num_tokens, ns.num_kv_heads, ns.head_dim)
    dtype = getattr(torch, ns.dtype_name)
    nbytes = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], ns.head_dim * nbytes), generator=gen,
                        dtype=torch.uint8)
    return raw.view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn])
def test_tensor_round_trip_is_bit_exact(client, dtype):
    ns = Namespace("m", num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype, page_size=4)
    tokens = list(range(100, 114))  # 3 full pages + 2 tokens of a partial page
    kv = random_kv(ns, len(tokens))
    assert client.put(tokens, kv, ns) == 3
    assert client.put(tokens, kv, ns) == 0  # present pages: a no-op
    got = client.get_closest(tokens, ns)
    assert isinstance(got, ClosestKV)
    assert got.num_tokens == 12
    assert got.tiers == ["cpu", "cpu", "cpu"]
    assert same_bits(got.kv, kv[:, :, :12])
    lookup = client.lookup(tokens, ns)
    assert (lookup.num_tokens, lookup.tiers) == (12, ["cpu"] * 3)


def test_prefix_of_a_stored_sequence_and_unknown_tokens(client):
    tokens = np.arange(1, 33, dtype=np.int64)
    kv = random_kv(SMALL, 32, seed=1)
    assert client.put(torch.from_numpy(tokens), kv, SMALL) == 8
    got = client.get_closest(list(tokens[:10]) + [999, 998], SMALL)
    assert got.num_tokens == 8 and same_bits(got.kv, kv[:, :, :8])
    assert client.get_closest([5, 6, 7, 8, 9], SMALL) is None
    assert client.lookup([5, 6, 7, 8], SMALL).num_tokens == 0
    assert client.put([1, 2, 3], random_kv(SMALL, 3), SMALL) == 0  # no full page


def test_more_than_4mib_per_request_and_pages_larger_than_a_frame(client):
    # Llama-3-8B-sized pages: 32 x 2 x 16 x 8 x 128 x bf16 = 2 MiB; 3 pages = 6 MiB per request.
    llama = Namespace("llama-3-8b", 32, 8, 128, torch.bfloat16)
    assert llama.page_nbytes == 2 << 20
    tokens = list(range(48))
    kv = random_kv(llama, 48, seed=2)
    assert client.put(tokens, kv, llama) == 3
    got = client.get_closest(tokens, llama)
    assert got.num_tokens == 48 and same_bits(got.kv, kv)
    # 10.5 MB pages (fp32) travel split over 1 MiB frames and are stitched back on both ends.
    big = Namespace("big", 80, 8, 128, torch.float32)
    assert big.page_nbytes == 10_485_760
    kv = random_kv(big, 32, seed=3)
    assert client.put(list(range(32)), kv, big) == 2
    got = client.get_closest(list(range(32)), big)
    assert got.num_tokens == 32 and same_bits(got.kv, kv)


def test_get_closest_stops_at_a_gap(client):
    tokens = list(range(20))  # 5 pages of 4
    kv = random_kv(SMALL, 20, seed=4)
    assert client.put(tokens, kv, SMALL) == 5
    assert client.delete(tokens, SMALL, page_indices=[2]) == 1
    assert client.delete(tokens, SMALL, page_indices=[2]) == 0
    assert client.delete(tokens, SMALL, page_indices=[]) == 0  # nothing, not "every page"
    got = client.get_closest(tokens, SMALL)
    assert got.num_tokens == 8 and same_bits(got.kv, kv[:, :, :8])  # ends before the hole
    assert client.lookup(tokens, SMALL).num_tokens == 8
    assert client.put(tokens, kv, SMALL) == 1  # only the missing page is new
    assert client.get_closest(tokens, SMALL).num_tokens == 20
    assert client.delete(tokens, SMALL) == 5
    assert client.get_closest(tokens, SMALL) is None


def test_raw_page_api_round_trip(client):
    tokens = list(range(7, 7 + 12))
    rng = np.random.default_rng(5)
    payloads = [rng.integers(0, 256, SMALL.page_nbytes, dtype=np.uint8).tobytes()
                for _ in range(3)]
    assert client.put_pages(SMALL, tokens, payloads) == 3
    got = client.get_closest_pages(SMALL, tokens + [1])
    assert got.num_tokens == 12 and got.tiers == ["cpu"] * 3
    assert [bytes(p) for p in got.payloads] == payloads
    # the tensor view of the same pages: page i is kv[:, :, 4i:4i+4] in [L, 2, P, H, D] order
    kv = client.get_closest(tokens, SMALL).kv
    page1 = kv[:, :, 4:8].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    assert page1 == payloads[1]
    with pytest.raises(InvalidRequest, match="3 full pages need 3 payloads, got 2"):
        client.put_pages(SMALL, tokens, payloads[:2])
    with pytest.raises(InvalidRequest, match=f"not {SMALL.page_nbytes} bytes"):
        client.put_pages(SMALL, tokens, [b"x"] * 3)


def test_salt_separates_tenants(client):
    tokens = list(range(8))
    kv = random_kv(SMALL, 8, seed=6)
    client.put(tokens, kv, SMALL.with_salt("tenant-a"))
    assert client.get_closest(tokens, SMALL.with_salt("tenant-b")) is None
    assert client.get_closest(tokens, SMALL.with_salt("tenant-a")).num_tokens == 8


def test_key_level_page_rpcs(client):
    tokens = np.arange(8, dtype=np.int32)
    keys = SMALL.page_keys(tokens)
    tok = tokens.astype("<i4").tobytes()
    pages = [(keys[i], encode_page(SMALL, keys[i], tok[16 * i : 16 * (i + 1)],
                                   bytes([i]) * SMALL.page_nbytes)) for i in range(2)]
    assert client.has_pages(keys) == [False, False]
    assert client.put_encoded_pages(pages) == 2
    assert client.put_encoded_pages(pages) == 0
    assert client.has_pages([keys[1], b"k" * 16]) == [True, False]
    got = client.get_pages([keys[1], b"k" * 16, keys[0]])
    assert [None if g is None else bytes(g) for g in got] == [pages[1][1], None, pages[0][1]]
    # the token-level API sees the same pages
    assert client.get_closest(tokens, SMALL).num_tokens == 8
    # a page whose bytes were changed is refused as a whole call: nothing is stored
    other = np.arange(100, 108, dtype=np.int32).astype("<i4")
    okeys = SMALL.page_keys(other)
    good, bad = (encode_page(SMALL, okeys[i], other[4 * i : 4 * i + 4].tobytes(),
                             bytes(SMALL.page_nbytes)) for i in range(2))
    bad = bytearray(bad)
    bad[-1] ^= 0xFF
    with pytest.raises(InvalidRequest, match="page 1: page checksum mismatch"):
        client.put_encoded_pages([(okeys[0], good), (okeys[1], bytes(bad))])
    with pytest.raises(InvalidRequest, match="page 0: page header key differs from its key"):
        client.put_encoded_pages([(okeys[1], good)])
    assert client.has_pages(okeys) == [False, False]
    with pytest.raises(InvalidRequest, match="page keys must be 16 bytes"):
        client.has_pages([b"short"])
    assert client.delete_pages([keys[0], b"k" * 16]) == 1
    assert client.get_closest(tokens, SMALL) is None  # page 0 gone: no prefix


def test_stats_health_and_reflection(server, client):
    client.put(list(range(8)), random_kv(SMALL, 8), SMALL)
    (cpu,) = client.stats()
    assert (cpu.name, cpu.num_pages, cpu.capacity_bytes, cpu.is_available) == (
        "cpu", 2, 256 << 20, True)
    assert cpu.used_bytes > 2 * SMALL.page_nbytes
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvmesh.v1.KVStore"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert "kvmesh.v1.KVStore" in names and "grpc.health.v1.Health" in names
