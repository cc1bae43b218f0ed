"""Mapped GetPages over real gRPC on loopback: a same-host client reads pages in the server's own
/dev/shm arenas. Byte-identical pages; leases keep slots from reuse until released or expired;
fallbacks (pages outside the arenas, a tier that is not shared, remote peers, arenas the client
cannot map, malformed replies); arena files removed with their arena and at stop."""

from __future__ import annotations

import os
import time

import pytest
from test_grpc_shm import SPACES, make_pages

from kvmesh.cachestore import StoreClient
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.rpc.server import serve_store
from kvmesh.cachestore.shm import client as shm_client
from kvmesh.cachestore.shm import page_lease, segments
from kvmesh.cachestore.shm.leases import MappedLeases
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.cachestore.tiers.disk import DiskTier
from kvmesh.v1 import store_pb2


@pytest.fixture
def server():
    srv = serve_store(StoreConfig(port=0, cpu_bytes=64 << 20))
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def client(server):
    """Shared memory on, plane "auto" (the conftest's NIXL client has shared memory off, and
    mapped gets are a shared-memory path whatever the plane)."""
    with StoreClient(server.target) as c:
        yield c


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def as_bytes(pages):
    return [None if p is None else bytes(p) for p in pages]


def test_mapped_get_reads_pages_where_the_server_keeps_them(server, client):
    pages = make_pages(12, seed=3)
    assert client.put_encoded_pages(pages) == 12
    keys = [key for key, _ in pages]
    missing = os.urandom(16)
    with client.get_pages_leased([*keys[:5], missing, *keys[5:]], mapped=True) as lease:
        assert lease.is_shared_memory and lease.is_valid()
        assert as_bytes(lease.pages) == [blob for _, blob in pages[:5]] + [None] + [
            blob for _, blob in pages[5:]]
        # the views lie in the server's arena files, not in a segment of this client
        arenas = set(client._segments.arenas.names)
        assert arenas and not arenas & set(client._segments.segment_names)
        assert all(os.path.exists(os.path.join(segments.SHM_DIR, name)) for name in arenas)
        assert len(lease.regions) == len(arenas)
        assert server.leases.num_leases == 1
    assert wait_until(lambda: server.leases.num_leases == 0)  # released by ReleasePages
    assert server.leases.num_granted == 1
    # a get that does not accept mapped pages still gets its own copies
    with client.get_pages_leased(keys) as lease:
        assert as_bytes(lease.pages) == [blob for _, blob in pages]
    assert server.leases.num_granted == 1


def test_leased_pages_are_not_overwritten_until_the_lease_ends(server, client):
    ns = SPACES[2]
    pages = make_pages(6, seed=4, spaces=[ns])
    client.put_encoded_pages(pages)
    keys = [key for key, _ in pages]
    tier = server.store.tiers[0]
    lease = client.get_pages_leased(keys, mapped=True)
    assert lease.valid_until is not None  # read in place, not copied
    # the store drops the pages and stores others of the same size: the leased slots stay
    assert client.delete_pages(keys) == 6
    others = make_pages(6, seed=5, spaces=[ns])
    client.put_encoded_pages(others)
    assert as_bytes(lease.pages) == [blob for _, blob in pages]

    def num_free_slots():
        return tier._slots.num_free_slots

    held = num_free_slots()
    lease.release()
    assert wait_until(lambda: server.leases.num_leases == 0)
    assert wait_until(lambda: num_free_slots() == held + 6)  # the lease held exactly those


def test_an_expired_lease_reads_as_invalid():
    srv = serve_store(StoreConfig(port=0, cpu_bytes=16 << 20, lease_s=0.05))
    try:
        with StoreClient(srv.target) as c:
            pages = make_pages(3, seed=8)
            c.put_encoded_pages(pages)
            with c.get_pages_leased([key for key, _ in pages], mapped=True) as lease:
                assert lease.is_shared_memory
                time.sleep(0.06)
                assert not lease.is_valid()
                assert srv.leases.num_leases == 0  # the server let go of the pages too
    finally:
        srv.stop(grace=0)


def test_pages_outside_the_arenas_come_through_the_segment(tmp_path):
    """A page read from the disk tier is not in an arena: the whole reply goes the old way."""
    ns = SPACES[2]
    pages = make_pages(8, seed=9, spaces=[ns])
    page_nbytes = len(pages[0][1])
    cpu = CpuTier(3 * page_nbytes, pin_memory=False, shared=True)
    store = TieredStore([cpu, DiskTier(str(tmp_path), 64 << 20)])
    srv = serve_store(StoreConfig(port=0), store)
    try:
        with StoreClient(srv.target) as c:
            c.put_encoded_pages(pages)
            keys = [key for key, _ in pages]
            with c.get_pages_leased(keys, mapped=True) as lease:
                assert as_bytes(lease.pages) == [blob for _, blob in pages]
                assert lease.valid_until is None  # in this client's segment, checked by the server
            assert srv.leases.num_granted == 0
            in_arenas = [key for key in cpu.keys_lru_order()
                         if cpu.locate_many(cpu.get_many([key])) != [None]]
            assert in_arenas
            with c.get_pages_leased(in_arenas, mapped=True) as lease:
                assert as_bytes(lease.pages) == [dict(pages)[key] for key in in_arenas]
                assert lease.valid_until is not None
    finally:
        srv.stop(grace=0)


def test_a_tier_that_is_not_shared_never_answers_mapped():
    srv = serve_store(StoreConfig(port=0), TieredStore([CpuTier(16 << 20, pin_memory=False)]))
    try:
        assert srv.leases is None
        with StoreClient(srv.target) as c:
            pages = make_pages(3, seed=10)
            c.put_encoded_pages(pages)
            with c.get_pages_leased([key for key, _ in pages], mapped=True) as lease:
                assert as_bytes(lease.pages) == [blob for _, blob in pages]
                assert lease.valid_until is None
    finally:
        srv.stop(grace=0)


def test_only_local_peers_get_mapped_pages():
    tier = CpuTier(1 << 20, pin_memory=False, shared=True)
    leases = MappedLeases(tier, ttl_s=30.0, max_leases=2)
    tier.put_many(make_pages(2, seed=11))
    keys = tier.keys_lru_order()
    blobs = tier.get_many(keys)
    assert leases.mapped_header(keys, blobs, "ipv4:10.1.2.3:4567") is None
    header = leases.mapped_header([b"x" * 16, *keys], [None, *blobs], "ipv4:127.0.0.1:4567")
    assert header is not None and list(header.is_found) == [False, True, True]
    # found by the addresses the tier kept, or by asking the buffers: the same places
    assert tier.locate_many(blobs, keys) == tier.locate_many(blobs)
    assert leases.num_leases == 1
    assert leases.mapped_header(keys, blobs, "unix:/x") is not None
    # full: the next get goes through a segment rather than end a live lease early
    assert leases.mapped_header(keys, blobs, "unix:/x") is None and leases.num_leases == 2
    assert leases.release([header.mapped.lease_id, 12345]) == 1
    tier.close()


def test_arena_files_stay_while_empty_and_go_at_close_and_stop():
    tier = CpuTier(1 << 20, pin_memory=False, shared=True)
    pages = make_pages(2, seed=12, spaces=[SPACES[0]])
    tier.put_many(pages)
    (name, _, _), _ = tier.locate_many(tier.get_many([pages[0][0]]) * 2)
    path = os.path.join(segments.SHM_DIR, name)
    assert os.path.exists(path)
    tier.delete_many([key for key, _ in pages])  # every slot free: the arena stays for reuse
    tier.put_many(pages[:1])
    assert tier.locate_many(tier.get_many([pages[0][0]]))[0][0] == name
    tier.close()
    assert not os.path.exists(path)
    srv = serve_store(StoreConfig(port=0, cpu_bytes=16 << 20))
    with StoreClient(srv.target) as c:
        c.put_encoded_pages(pages)
        with c.get_pages_leased([pages[0][0]], mapped=True) as lease:
            assert lease.pages[0] is not None
            names = c._segments.arenas.names
    srv.stop(grace=0)
    assert names and not any(os.path.exists(os.path.join(segments.SHM_DIR, n)) for n in names)


def mapped_header(names, offsets, arenas=(0,), nbytes=(100,), lease_id=7):
    return store_pb2.GetPagesHeader(
        is_found=[True] * len(offsets), page_nbytes=[100] * len(offsets), page_offsets=offsets,
        mapped=store_pb2.MappedPages(arena_names=names, arena_nbytes=[1000] * len(names),
                                     page_arenas=list(arenas), lease_id=lease_id, lease_ms=1000))


def test_malformed_mapped_replies_are_refused():
    assert page_lease.fits_mapped(mapped_header(["kvmesh-ab"], [0]))
    assert not page_lease.fits_mapped(mapped_header(["kvmesh-ab"], [901]))  # past the arena
    assert not page_lease.fits_mapped(mapped_header(["kvmesh-ab"], [0], arenas=(1,)))
    assert not page_lease.fits_mapped(mapped_header(["kvmesh-ab"], [0], lease_id=0))
    assert not page_lease.fits_mapped(mapped_header(["kvmesh-ab"], [0, 100], arenas=(0,)))


def test_arenas_that_cannot_be_mapped_end_the_lease_and_fall_back():
    pool = shm_client.SegmentPool()
    ended, accepted = [], []

    def fetch(keys, segment, accept_mapped):
        accepted.append(accept_mapped)
        if accept_mapped:  # names a file that does not exist (or a path: refused outright)
            return mapped_header(["kvmesh-0123456789abcdef"], [0]), []
        return store_pb2.GetPagesHeader(is_found=[True], page_nbytes=[3]), [memoryview(b"abc")]

    def end_lease(lease_id, bad_keys):
        ended.append(lease_id)

    with pool.read(fetch, [b"k" * 16], end_lease) as lease:
        assert as_bytes(lease.pages) == [b"abc"]
    assert accepted == [True, False] and ended == [7]
    with pool.read(fetch, [b"k" * 16], end_lease) as lease:  # not asked again for a while
        assert as_bytes(lease.pages) == [b"abc"]
    assert accepted == [True, False, False]
    pool.close()


def test_a_put_names_the_arenas_its_pages_landed_in(server):
    """A client that page-locks what it maps (on_new_segment) maps them at once, off the path
    of its first mapped get; one without that hook maps only the arenas its put copied the
    pages into (same-host puts, test_shm_puts.py)."""
    mapped = []
    pages = make_pages(4, seed=13)
    with StoreClient(server.target, on_new_segment=lambda a, n: mapped.append((a, n))) as c:
        c.put_encoded_pages(pages)
        names = c._segments.arenas.names
        # every arena named is mapped and passed to the hook (the data plane's own buffers,
        # when it carries the put, go to the hook too)
        arenas = {(m.address, m.nbytes) for m in c._segments.arenas._mapped.values()}
        assert names and len(arenas) == len(names) and arenas <= set(mapped)
        with c.get_pages_leased([key for key, _ in pages], mapped=True) as lease:
            assert as_bytes(lease.pages) == [blob for _, blob in pages]
            assert set(lease.regions) <= set(mapped)
    with StoreClient(server.target) as c:
        c.put_encoded_pages(make_pages(2, seed=14))
        # (two page sizes: two arenas)
        assert len(c._segments.arenas.names) == 2 and c._shm_puts.num_pages_copied == 2


def test_a_bad_page_reported_with_the_release_is_checked_and_dropped(server, client):
    """The store does not check mapped pages itself; the reader does, and tells it. The store
    then checks the page on its own and drops it only if it really is bad."""
    pages = make_pages(3, seed=15)
    client.put_encoded_pages(pages)
    keys = [key for key, _ in pages]
    with client.get_pages_leased(keys, mapped=True) as lease:
        maps = client._segments.arenas._mapped.values()
        (mapping,) = [m for m in maps if m.address <= lease.addresses[1] < m.address + m.nbytes]
        view = lease.pages[1]
        offset = lease.addresses[1] - mapping.address
        mapping.mm[offset + len(view) - 1] ^= 1  # a flipped payload byte in the store's memory
        assert bytes(lease.pages[1]) != pages[1][1]
        lease.report_bad([keys[0], keys[1]])  # page 0 is fine: the store keeps it
    assert wait_until(lambda: client.has_pages(keys) == [True, False, True])


def test_a_failing_map_hook_or_a_closed_client_fails_no_read(server):
    """Page-locking failing only makes reads slower; a lease released after its client closed
    just runs out on the server."""
    def broken_hook(address, nbytes):
        raise RuntimeError("cudaHostRegister failed")

    pages = make_pages(3, seed=16)
    keys = [key for key, _ in pages]
    c = StoreClient(server.target, on_new_segment=broken_hook)
    c.put_encoded_pages(pages)  # maps the arenas ahead: the hook fails there
    lease = c.get_pages_leased(keys, mapped=True)
    assert lease.valid_until is not None
    assert as_bytes(lease.pages) == [blob for _, blob in pages]
    c.close()
    lease.release()
    assert server.leases.num_leases == 1  # until lease_s is up
