"""The NIXL data plane on a real store server (UCX over TCP on loopback, conftest.py): a page
is checked before it becomes visible and after it is read; reservations and leases expire and
give their slots back; the page-key scopes hold for the new RPCs; a store and a client without
nixl fall back to the gRPC frames. (Every key-level test of the gRPC modules also runs over
this plane: conftest's `client`.)"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from test_grpc_mapped import wait_until
from test_grpc_scopes import ALICE_RW, INTERNAL, SECRET, _token_file
from test_grpc_shm import SPACES
from test_grpc_shm import make_pages as mixed_pages
from test_store_hardening import start_store, stop_store

from kvmesh.cachestore import StoreClient
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.dataplane import agent
from kvmesh.cachestore.errors import InvalidRequest, PermissionDenied, StoreUnavailable
from kvmesh.cachestore.rpc.server import serve_store
from kvmesh.cachestore.store.reservations import MIN_PAGE_NBYTES
from kvmesh.v1 import store_pb2

pytestmark = pytest.mark.skipif(agent.nixl_api() is None, reason="nixl is not installed")
TTL_S = 0.3


def make_pages(num_pages: int, seed: int):
    """Encoded pages of one size (one namespace)."""
    return mixed_pages(num_pages, seed, SPACES[:1])


@pytest.fixture(scope="module")
def server():
    srv = serve_store(StoreConfig(port=0, cpu_bytes=32 << 20, lease_s=TTL_S, data_plane="nixl"))
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def nixl(server):
    """NIXL for gets and puts: shared memory off (on the same host puts would copy into the
    server's shared arenas instead, test_shm_puts.py)."""
    with StoreClient(server.target, data_plane="nixl", shared_memory=False) as c:
        yield c


def reserve_and_write(client, pages):
    """ReservePages + NIXL WRITE of `pages`, uncommitted: the reservation id."""
    plane = client._plane
    assert plane.is_on()
    nbytes = len(pages[0][1])
    reply = plane._call("ReservePages", store_pb2.ReservePagesRequest(
        num_pages=len(pages), page_nbytes=nbytes))
    places = [(s.arena_id, s.offset, s.nbytes) for s in reply.slots]
    assert len(places) == len(pages)
    initiator = plane._ready(reply.arena_epoch, places)
    buffer = initiator.acquire(nbytes * len(pages))
    for i, (_, blob) in enumerate(pages):
        buffer.array[i * nbytes : (i + 1) * nbytes] = np.frombuffer(blob, np.uint8)
    initiator.write(places, buffer)
    initiator.give_back(buffer)
    return reply.reservation_id


def commit(client, reservation_id, keys):
    return client._plane._call("CommitPages", store_pb2.CommitPagesRequest(
        reservation_id=reservation_id, keys=keys))


def test_pages_round_trip_through_the_plane_unchanged(server, nixl):
    pages = mixed_pages(9, seed=40)  # three sizes: a reservation per size
    assert nixl.put_encoded_pages(pages) == 9
    assert nixl.put_encoded_pages(pages) == 0  # present: a no-op
    assert server.data_plane.num_reservations == 0
    with nixl.get_pages_leased([key for key, _ in pages]) as lease:
        assert not lease.is_shared_memory and lease.regions
        assert [bytes(p) for p in lease.pages] == [blob for _, blob in pages]
    assert wait_until(lambda: server.data_plane.num_leases == 0)  # ended right after the READ


def test_a_put_writes_from_the_callers_memory_not_a_copy(nixl, monkeypatch):
    from kvmesh.cachestore.dataplane.initiator import Initiator

    pages = make_pages(6, seed=43)
    nbytes = len(pages[0][1])
    caller = np.frombuffer(b"".join(blob for _, blob in pages), np.uint8)  # one array, sliced
    views = [(key, caller.data[i * nbytes : (i + 1) * nbytes]) for i, (key, _) in
             enumerate(pages)]
    assert nixl._plane.is_on()
    registered = []
    initiator = nixl._plane._initiator
    register = initiator.agent.register_memory
    monkeypatch.setattr(initiator.agent, "register_memory",
                        lambda descs, mem: registered.append(len(descs)) or register(descs, mem))
    monkeypatch.setattr(Initiator, "acquire", lambda *args: pytest.fail("a buffer was used"))
    assert nixl.put_encoded_pages(views[:4]) == 4
    assert registered == [4]  # one registration for the call, of the caller's pages
    # pages already in one of the client's registered buffers: no registration at all
    monkeypatch.undo()
    buffer = initiator.acquire(2 * nbytes)
    buffer.array[: 2 * nbytes] = caller[4 * nbytes :]
    monkeypatch.setattr(initiator.agent, "register_memory", lambda *a: pytest.fail("registered"))
    assert nixl.put_encoded_pages([(pages[4][0], buffer.array.data[:nbytes]),
                                   (pages[5][0], buffer.array.data[nbytes : 2 * nbytes])]) == 2
    initiator.give_back(buffer)
    assert nixl._plane.num_pages_written == 6
    assert nixl.get_pages([key for key, _ in pages]) == [blob for _, blob in pages]


def test_memory_the_backend_will_not_register_is_copied_then_written(nixl, monkeypatch):
    pages = make_pages(3, seed=44)
    assert nixl._plane.is_on()
    initiator = nixl._plane._initiator
    initiator.reserve(4 << 20)  # the copy's buffer exists: only the caller's pages fail

    def refuse(*args):
        raise RuntimeError("nixlBackendError: cannot register")

    monkeypatch.setattr(initiator.agent, "register_memory", refuse)
    assert nixl.put_encoded_pages(pages) == 3
    assert nixl._plane.num_pages_written == 3  # over the plane, not the frames
    assert nixl.get_pages([key for key, _ in pages]) == [blob for _, blob in pages]


def test_a_corrupt_page_written_through_the_plane_is_never_visible(nixl):
    pages = make_pages(3, seed=41)
    bad = bytearray(pages[1][1])
    bad[-1] ^= 0xFF
    with pytest.raises(InvalidRequest, match="page 1: page checksum mismatch"):
        nixl.put_encoded_pages([pages[0], (pages[1][0], bytes(bad)), pages[2]])
    assert nixl.has_pages([key for key, _ in pages]) == [False] * 3  # none of the call
    # intact bytes committed under another key: the header names its own key
    reservation = reserve_and_write(nixl, pages[:1])
    with pytest.raises(InvalidRequest, match="key"):
        commit(nixl, reservation, [pages[2][0]])
    assert nixl.get_pages([pages[0][0], pages[2][0]]) == [None, None]


def test_one_bad_page_of_a_large_commit_stores_none(nixl):
    pages = mixed_pages(80, seed=49, spaces=SPACES[2:])  # ~10.6 MB: checked on the bulk pool
    bad = bytearray(pages[70][1])
    bad[-1] ^= 0xFF
    pages[70] = (pages[70][0], bytes(bad))
    with pytest.raises(InvalidRequest, match="page 70: page checksum mismatch"):
        nixl.put_encoded_pages(pages)
    assert not any(nixl.has_pages([key for key, _ in pages]))


def test_an_expired_reservation_cannot_be_committed(server, nixl):
    pages = make_pages(2, seed=42)
    reservation = reserve_and_write(nixl, pages)
    time.sleep(TTL_S * 1.5)
    assert commit(nixl, reservation, [key for key, _ in pages]).is_expired
    assert nixl.has_pages([key for key, _ in pages]) == [False, False]
    reservation = reserve_and_write(nixl, pages)  # in time: committed
    reply = commit(nixl, reservation, [key for key, _ in pages])
    assert reply.num_pages_stored == 2 and not reply.is_expired
    assert commit(nixl, reservation, [key for key, _ in pages]).is_expired  # only once


def test_an_aborted_reservation_holds_its_slots_one_ttl(server, nixl):
    """A commit of no keys (the client's WRITE failed) ends the reservation but keeps its slots
    out of use for one TTL, as expiry does: a cut-off WRITE may still land in them."""
    plane, slots = server.data_plane, server.store.tiers[0].slots
    time.sleep(TTL_S * 2.5)  # earlier tests' cooling slots end
    assert wait_until(lambda: plane.num_reservations == 0 and plane.num_leases == 0)
    nbytes = len(make_pages(1, seed=50)[0][1])
    reply = nixl._plane._call("ReservePages", store_pb2.ReservePagesRequest(
        num_pages=3, page_nbytes=nbytes))
    assert reply.reservation_id and len(reply.slots) == 3
    free = slots.num_free_slots
    aborted = commit(nixl, reply.reservation_id, [])
    assert aborted.num_pages_stored == 0 and not aborted.is_expired
    assert plane.num_reservations == 0
    assert slots.num_free_slots == free  # held
    assert commit(nixl, reply.reservation_id, []).is_expired  # ended
    assert wait_until(lambda: plane.num_reservations == 0 and slots.num_free_slots == free + 3)


@pytest.mark.parametrize("page_nbytes", [1, MIN_PAGE_NBYTES - 1, (1 << 30) + 1, 1 << 40])
def test_a_reservation_of_a_page_size_no_page_has_is_refused(nixl, page_nbytes):
    with pytest.raises(InvalidRequest, match="page_nbytes|bytes"):
        nixl._plane._call("ReservePages", store_pb2.ReservePagesRequest(
            num_pages=1, page_nbytes=page_nbytes))


def test_an_arena_the_agent_will_not_register_stays_off_the_plane(caplog):
    with serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, lease_s=TTL_S)) as srv, \
            StoreClient(srv.target, data_plane="auto", shared_memory=False) as auto:
        plane = srv.data_plane
        hello = plane.hello()

        def refuse(*args):
            raise RuntimeError("nixlBackendError: cannot register")

        plane.agent.register_memory = refuse  # the next arena made (for a new page size)
        pages = make_pages(3, seed=51)
        assert auto.put_encoded_pages(pages) == 3  # by the frames, not UNKNOWN
        assert "not registered" in caplog.text
        assert srv.store.tiers[0].slots.num_arenas > len(hello.arenas)
        assert plane.hello().arenas == hello.arenas and plane.arena_epoch == hello.arena_epoch
        assert plane.num_reservations == 0
        assert auto.get_pages([key for key, _ in pages]) == [blob for _, blob in pages]


def test_pages_whose_reservation_expired_go_by_the_frames():
    with serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, lease_s=1e-6)) as srv, \
            StoreClient(srv.target, data_plane="nixl", shared_memory=False) as nixl:
        pages = make_pages(3, seed=46)
        assert nixl.put_encoded_pages(pages) == 3
        assert nixl.get_pages([key for key, _ in pages]) == [blob for _, blob in pages]


def test_a_private_store_offers_the_plane_over_plain_arenas():
    with serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, shared_memory=False)) as srv, \
            StoreClient(srv.target) as auto:
        plane = srv.data_plane
        assert plane is not None and not srv.store.tiers[0].is_shared
        assert auto.data_plane == "nixl"
        pages = make_pages(3, seed=48)
        assert auto.put_encoded_pages(pages) == 3
        # the store declined shared memory (its arenas are private): written through the plane
        assert auto._plane.num_pages_written == 3 and auto._shm_puts.num_pages_copied == 0
        with auto.get_pages_leased([key for key, _ in pages]) as lease:
            assert not lease.is_shared_memory and lease.regions
            assert [bytes(p) for p in lease.pages] == [blob for _, blob in pages]


def test_a_lease_pins_its_slot_until_released_or_expired():
    srv = serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, lease_s=TTL_S))
    with srv, StoreClient(srv.target, data_plane="nixl", shared_memory=False) as nixl:
        _check_slot_pinned_until_lease_ends(srv, nixl)


def _check_slot_pinned_until_lease_ends(server, nixl):
    slots = server.store.tiers[0].slots
    pages = make_pages(1, seed=43)
    nixl.put_encoded_pages(pages)
    nixl.delete_pages([pages[0][0]])
    time.sleep(TTL_S * 2.5)  # (no reservation is cooling)
    free = slots.num_free_slots
    keys = [pages[0][0]]
    for end in ("release", "expiry"):
        assert nixl.put_encoded_pages(pages) == 1
        lease = nixl._plane._call("LeasePages", store_pb2.PageKeys(keys=keys))
        assert lease.lease_id and list(lease.is_found) == [True]
        assert nixl.delete_pages(keys) == 1  # dropped by the tier, still leased
        assert slots.num_free_slots == free - 1
        if end == "release":
            nixl._page_gets.end_lease(lease.lease_id)
            assert wait_until(lambda: server.data_plane.num_leases == 0)
        else:
            time.sleep(TTL_S * 1.5)
        assert server.data_plane.num_leases == 0
        assert slots.num_free_slots == free


def test_page_key_scopes_hold_for_the_plane(tmp_path):
    token_file = _token_file(tmp_path, [{"token": ALICE_RW, "tenant": "alice",
                                         "access": "read-write"}])
    with serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, token=INTERNAL,
                                 token_file=token_file, tenant_secret=SECRET)) as srv:
        pages = make_pages(1, seed=44)
        with StoreClient(srv.target, token=INTERNAL, data_plane="nixl",
                         shared_memory=False) as internal:
            assert internal.put_encoded_pages(pages) == 1
        with StoreClient(srv.target, token=ALICE_RW, data_plane="grpc") as alice:
            for name, request in (("DataPlaneHello", store_pb2.DataPlaneHelloRequest()),
                                  ("LeasePages", store_pb2.PageKeys(keys=[pages[0][0]])),
                                  ("ReservePages", store_pb2.ReservePagesRequest(
                                      num_pages=1, page_nbytes=len(pages[0][1])))):
                stub = alice._channel.unary_unary(
                    f"/kvmesh.v1.KVStore/{name}", type(request).SerializeToString,
                    store_pb2.LeasePagesResponse.FromString)
                with pytest.raises(Exception, match="internal token"):
                    stub(request, metadata=alice._metadata)
        with StoreClient(srv.target, token=ALICE_RW) as alice, pytest.raises(PermissionDenied):
            alice.get_pages_leased([pages[0][0]])


def test_without_nixl_both_ends_use_the_frames(monkeypatch, caplog):
    monkeypatch.setattr(agent, "nixl_api", lambda: None)
    caplog.set_level("INFO")
    with serve_store(StoreConfig(port=0, cpu_bytes=1 << 20)) as srv:
        assert srv.data_plane is None
        assert "store data plane: gRPC frames only" in caplog.text
        with StoreClient(srv.target) as c:
            pages = make_pages(2, seed=45)
            assert c.put_encoded_pages(pages) == 2
            assert c.data_plane == "grpc"
            assert c.get_pages([key for key, _ in pages]) == [blob for _, blob in pages]


def test_a_failed_transfer_falls_back_to_the_frames_unless_nixl_is_required(server, monkeypatch):
    from kvmesh.cachestore.dataplane.initiator import Initiator
    from kvmesh.cachestore.errors import StoreUnavailable

    def broken(*args, **kwargs):
        raise OSError("NIXL READ: nixlBackendError")

    pages = make_pages(4, seed=47)
    keys = [key for key, _ in pages]
    with StoreClient(server.target, data_plane="auto", shared_memory=False) as auto, \
            StoreClient(server.target, data_plane="nixl", shared_memory=False) as required:
        assert auto.data_plane == "nixl" and required.data_plane == "nixl"
        monkeypatch.setattr(Initiator, "write_from", broken)
        monkeypatch.setattr(Initiator, "read", broken)
        assert auto.put_encoded_pages(pages) == 4  # by PutPages
        assert auto.get_pages(keys) == [blob for _, blob in pages]  # by GetPages
        with pytest.raises(StoreUnavailable, match="nixlBackendError"):
            required.get_pages(keys)
    assert wait_until(lambda: server.data_plane.num_leases == 0)  # ended though it failed
    assert server.data_plane.num_reservations == 0  # the failed put gave its slots back


def test_a_transfer_to_a_stalled_store_ends_at_the_clients_timeout(monkeypatch):
    """A store stopped (SIGSTOP) between its gRPC answer and the NIXL transfer: the transfer
    is cancelled at the client's timeout, without spinning a core; the call falls back to the
    frames (which time out too: StoreUnavailable) rather than hang, and the client works again
    once the store runs again."""
    timeout = 0.5
    proc, target = start_store("--cpu-bytes", "16M", "--data-plane", "nixl")
    pages = make_pages(4, seed=48)
    keys = [key for key, _ in pages]
    try:
        with StoreClient(target, timeout=timeout, shared_memory=False, breaker=None) as client:
            assert client.put_encoded_pages(pages) == 4 and client.data_plane == "nixl"
            plane = client._plane
            ready = plane._ready

            def stop_then_ready(*args):
                initiator = ready(*args)
                proc.send_signal(signal.SIGSTOP)  # answered the lease/reservation, now stalls
                return initiator

            monkeypatch.setattr(plane, "_ready", stop_then_ready)
            for call in (lambda: client.get_pages(keys),
                         lambda: client.put_encoded_pages(make_pages(4, seed=49))):
                started, cpu = time.monotonic(), time.thread_time()
                try:  # the transfer's timeout, then maybe one more (frames or abort)
                    call()
                    timed_out = False  # the signal came after the transfer had finished
                except StoreUnavailable:
                    timed_out = True
                waited = time.monotonic() - started
                assert waited < 2 * timeout + 2.0, waited  # never hangs
                assert not timed_out or waited > timeout - 0.1, waited
                # a wait of its timeout was spent asleep, not spinning (a call the signal came
                # too late for finished in a few ms, mostly CPU: nothing to check there)
                assert not timed_out or time.thread_time() - cpu < 0.5 * waited
                proc.send_signal(signal.SIGCONT)
            monkeypatch.undo()
            assert wait_until(lambda: client.get_pages(keys) == [blob for _, blob in pages])
            assert plane.is_on() and plane.num_pages_read >= 4
    finally:
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)
        stop_store(proc)
