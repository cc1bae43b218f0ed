"""Same-host shared-memory GetPages over real gRPC on a random loopback port: byte-identical to the
inline path, leases and the segment pool (reuse, growth, no aliasing, cleanup), fallbacks (feature
off, forged or bad segments) and the on_new_segment callback. The pool and the writer without a
server: test_shm_pool.py."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.rpc.server import serve_store
from kvmesh.cachestore.shm import client as shm_client
from kvmesh.cachestore.shm import segments
from kvmesh.v1 import store_pb2

# Odd page sizes: encoded pages of 3 different lengths, none a multiple of 8.
SPACES = [
    Namespace("shm-a", num_layers=3, num_kv_heads=1, head_dim=9, dtype=torch.float16, page_size=5),
    Namespace(
        "shm-b", num_layers=1, num_kv_heads=3, head_dim=41, dtype=torch.bfloat16, page_size=3
    ),
    Namespace(
        "shm-c", num_layers=7, num_kv_heads=2, head_dim=341, dtype=torch.float32, page_size=7
    ),
]


def make_pages(num_pages: int, seed: int, spaces=SPACES) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    pages = []
    for i in range(num_pages):
        ns = spaces[i % len(spaces)]
        key = rng.bytes(16)
        tokens = rng.integers(0, 50_000, ns.page_size, dtype=np.int32).tobytes()
        pages.append((key, encode_page(ns, key, tokens, rng.bytes(ns.page_nbytes))))
    return pages


@pytest.fixture(scope="module")
def server():  # `client` connects to it
    # the shared-memory segments are the gRPC plane's same-host path: no NIXL here
    srv = serve_store(StoreConfig(port=0, cpu_bytes=256 << 20, data_plane="grpc"))
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def client(server):
    """gRPC frames only (the conftest's `client` also runs each test over NIXL): the
    shared-memory segments are that plane's same-host path."""
    with StoreClient(server.target, data_plane="grpc") as c:
        yield c


@pytest.fixture(scope="module")
def stored(server):
    """(keys with 3 missing ones mixed in, expected encoded page or None per key)."""
    pages = make_pages(24, seed=1)
    with StoreClient(server.target) as c:
        assert c.put_encoded_pages(pages) == len(pages)
    missing = [os.urandom(16) for _ in range(3)]
    keys = [key for key, _ in pages]
    keys[4:4], keys[11:11] = [missing[0]], missing[1:]
    by_key = dict(pages)
    return keys, [by_key.get(key) for key in keys]


def as_bytes(pages: list) -> list[bytes | None]:
    return [None if p is None else bytes(p) for p in pages]


def test_shared_memory_matches_inline(server, client, stored):
    keys, expected = stored
    with StoreClient(server.target, shared_memory=False) as inline:
        plain = inline.get_pages_leased(keys)
        assert not plain.is_shared_memory and as_bytes(plain.pages) == expected
        assert as_bytes(inline.get_pages(keys)) == expected
    with client.get_pages_leased(keys) as lease:
        assert lease.is_shared_memory
        assert as_bytes(lease.pages) == expected
        assert all(p.readonly for p in lease.pages if p is not None)
    assert as_bytes(client.get_pages(keys)) == expected  # copied out, safe after release
    assert client.get_pages_leased([]).pages == []


def test_prefix_only_stops_at_first_missing(server, client, stored):
    keys, expected = stored
    want = expected[:4] + [None] * (len(keys) - 4)
    with client.get_pages_leased(keys, prefix_only=True) as lease:
        assert lease.is_shared_memory and as_bytes(lease.pages) == want
    with StoreClient(server.target, shared_memory=False) as inline:
        assert as_bytes(inline.get_pages(keys, prefix_only=True)) == want


def test_live_leases_do_not_alias_and_release_reuses(client, stored):
    keys, expected = stored
    first = client.get_pages_leased(keys[:6])
    second = client.get_pages_leased(keys[6:])
    assert first.is_shared_memory and second.is_shared_memory
    assert len(client._segments.segment_names) == 2
    assert as_bytes(first.pages) == expected[:6] and as_bytes(second.pages) == expected[6:]
    names = client._segments.segment_names
    first.release()
    first.release()  # idempotent
    with pytest.raises(ValueError):
        bytes(first.pages[0])  # released views are dead
    second.release()
    for _ in range(3):
        with client.get_pages_leased(keys) as lease:
            assert as_bytes(lease.pages) == expected
    assert client._segments.segment_names == names  # reused: no new file


def test_a_reserved_segment_serves_the_first_get(server, stored):
    """A worker reserves a segment for its longest prefix at start (on_new_segment runs then,
    e.g. page-locking it); the first get uses it instead of making one."""
    keys, expected = stored
    made = []
    with StoreClient(server.target, on_new_segment=lambda a, n: made.append(n)) as c:
        need = sum(len(p) for p in expected if p is not None)
        c.reserve_segment(need)
        c.reserve_segment(need)  # one fits already: nothing new
        names = c._segments.segment_names
        assert len(names) == 1 and len(made) == 1 and made[0] >= need
        with c.get_pages_leased(keys) as lease:
            assert lease.is_shared_memory and as_bytes(lease.pages) == expected
        assert c._segments.segment_names == names and len(made) == 1
    with StoreClient(server.target, shared_memory=False) as inline:
        inline.reserve_segment(need)  # no shared memory: nothing to reserve


def test_segment_grows_when_too_small(server, monkeypatch):
    monkeypatch.setattr(shm_client, "MIN_SEGMENT_NBYTES", 1 << 16)
    monkeypatch.setattr(shm_client, "SEGMENT_ALIGN_NBYTES", 1 << 12)
    pages = make_pages(30, seed=2, spaces=SPACES[2:])  # ~133 KB each
    with StoreClient(server.target) as client:
        client.put_encoded_pages(pages)
        keys = [key for key, _ in pages]
        with client.get_pages_leased(keys[:1]) as lease:
            assert lease.is_shared_memory and bytes(lease.pages[0]) == pages[0][1]
        before = set(client._segments.segment_names)
        with client.get_pages_leased(keys) as lease:  # 4 MB: the server asks for more
            assert lease.is_shared_memory
            assert as_bytes(lease.pages) == [blob for _, blob in pages]
        (grown,) = set(client._segments.segment_names) - before
        size = os.stat(os.path.join(segments.SHM_DIR, grown)).st_size
        assert size >= sum(len(blob) for _, blob in pages)
        with client.get_pages_leased(keys) as lease:  # fits now: no new segment
            assert as_bytes(lease.pages) == [blob for _, blob in pages]
        assert grown in client._segments.segment_names
        assert len(set(client._segments.segment_names) - before) == 1


def test_server_without_shared_memory_answers_inline(stored):
    pages = make_pages(9, seed=3)
    with serve_store(StoreConfig(port=0, cpu_bytes=64 << 20, shared_memory=False)) as srv:
        with StoreClient(srv.target) as client:
            client.put_encoded_pages(pages)
            keys = [key for key, _ in pages] + [os.urandom(16)]
            with client.get_pages_leased(keys) as lease:
                assert not lease.is_shared_memory
                assert as_bytes(lease.pages) == [blob for _, blob in pages] + [None]


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "kvmesh-../../etc/passwd",
        "kvmesh-xyz",
        "kvmesh-0123abcd",
        "kvmesh-",
        "kvmesh-link",
        "small",
        "",
    ],
)
def test_forged_segment_falls_back_to_inline(client, stored, tmp_path, name):
    keys, expected = stored
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched" * 1000)
    made = []
    if name == "kvmesh-link":  # a symlink with a valid name: O_NOFOLLOW refuses it
        name = segments.NAME_PREFIX + os.urandom(6).hex()
        os.symlink(victim, os.path.join(segments.SHM_DIR, name))
        made.append(name)
    elif name == "small":  # a real segment smaller than the capacity claimed
        name = segments.NAME_PREFIX + os.urandom(6).hex()
        with open(os.path.join(segments.SHM_DIR, name), "wb") as f:
            f.write(b"x" * 100)
        made.append(name)
    try:
        request = store_pb2.PageKeys(
            keys=keys, segment=store_pb2.SharedMemorySegment(name=name, capacity=64 << 20)
        )
        header, *frames = list(client._page_gets._get_pages(request))
        assert not header.is_shared_memory and not header.segment_nbytes_needed
        assert b"".join(frames) == b"".join(p for p in expected if p is not None)
        assert victim.read_bytes() == b"untouched" * 1000
        if made and not os.path.islink(os.path.join(segments.SHM_DIR, made[0])):
            with open(os.path.join(segments.SHM_DIR, made[0]), "rb") as f:
                assert f.read() == b"x" * 100  # too small: nothing written
    finally:
        for made_name in made:
            os.unlink(os.path.join(segments.SHM_DIR, made_name))
    with client.get_pages_leased(keys) as lease:  # the server is fine afterwards
        assert as_bytes(lease.pages) == expected


def test_opt_out_and_close_remove_files(server, stored):
    keys, expected = stored
    with StoreClient(server.target, shared_memory=False) as client:
        assert client._segments is None
        assert as_bytes(client.get_pages(keys)) == expected
    seen: list[tuple[int, int]] = []
    client = StoreClient(server.target, on_new_segment=lambda a, n: seen.append((a, n)))
    with client.get_pages_leased(keys) as lease:
        ((address, nbytes),) = seen
        assert nbytes >= shm_client.MIN_SEGMENT_NBYTES and address % mmap.PAGESIZE == 0
        first = next(p for p in lease.pages if p is not None)
        assert ctypes.string_at(address, first.nbytes) == bytes(first)  # page 0 at offset 0
    paths = [os.path.join(segments.SHM_DIR, name) for name in client._segments.segment_names]
    assert paths and all(os.stat(p).st_mode & 0o777 == 0o600 for p in paths)
    client.close()
    assert not any(os.path.exists(p) for p in paths)


@pytest.mark.parametrize("shared_memory", [True, False])
def test_a_corrupt_stored_page_is_a_miss_and_dropped(shared_memory):
    """Through the segment the server checks each page on its copy there; inline it checks the
    stored bytes. Either way a flipped payload byte or a page under the wrong key reads as
    missing, and the store drops it."""
    from kvmesh.cachestore.store.tiered import TieredStore
    from kvmesh.cachestore.tiers.cpu import CpuTier

    tier = CpuTier(64 << 20)
    srv = serve_store(StoreConfig(port=0, cpu_bytes=64 << 20), TieredStore([tier]))
    try:
        pages = make_pages(6, seed=7)
        flipped = bytearray(pages[2][1])
        flipped[-3] ^= 0x20  # a payload byte: only the checksum catches it
        tier.put_many([pages[0], pages[1], (pages[2][0], bytes(flipped)), pages[3],
                       (pages[4][0], pages[5][1])])  # page 5's bytes under page 4's key
        keys = [key for key, _ in pages[:5]]
        with StoreClient(srv.target, shared_memory=shared_memory) as client:
            with client.get_pages_leased(keys) as lease:
                assert lease.is_shared_memory == shared_memory
                assert as_bytes(lease.pages) == [pages[0][1], pages[1][1], None, pages[3][1], None]
        assert tier.contains_many(keys) == [True, True, False, True, False]
    finally:
        srv.stop(grace=0)
