"""Same-host shared-memory puts against a real `kvmesh store` process: the client copies pages
into slots of the store's /dev/shm arenas and commits them; the store checks every page before
any becomes visible. Round trip without NIXL, corrupt or mislabelled slots refused at commit,
aborted and expired reservations hold their slots one TTL and then free them (within the tier's
bounded memory), the page-key scope and tenants hold, and every way shared memory is off or
declined falls back to the next path."""

from __future__ import annotations

import ctypes
import time

import pytest
from test_grpc_scopes import ALICE_RW, BOB_RO, INTERNAL, KV, NS, SECRET, TOKENS, _token_file
from test_grpc_shm import SPACES, make_pages
from test_store_hardening import start_store, stop_store

from kvmesh.cachestore import StoreClient
from kvmesh.cachestore.client import kv_pages
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.errors import InvalidRequest, PermissionDenied
from kvmesh.cachestore.rpc.auth import tenant_salt
from kvmesh.v1 import store_pb2

TTL_S = 1.0


@pytest.fixture(scope="module")
def store():
    """A store offering no NIXL plane (shared-memory puts need none), 4 MiB cpu tier."""
    proc, target = start_store("--cpu-bytes", "4M", "--lease-s", str(TTL_S),
                               "--data-plane", "grpc")
    yield target
    stop_store(proc)


@pytest.fixture
def client(store):
    with StoreClient(store) as c:
        yield c


def reserve(client, num_pages: int, nbytes: int):
    """ReservePages(shared_memory) as the client sends it (the raw reply)."""
    return client._shm_puts._reserve_slots(num_pages, nbytes)


def commit(client, reservation_id: int, keys):
    return client._shm_puts._call(client._shm_puts._commit, store_pb2.CommitPagesRequest(
        reservation_id=reservation_id, keys=keys))


def write_slots(client, reply, blobs) -> None:
    """Copy blobs[i] into slot i of the reservation, through the client's own mappings."""
    named = {a.arena_id: a for a in reply.shared_arenas}
    for slot, blob in zip(reply.slots, blobs, strict=True):
        arena = named[slot.arena_id]
        mapped = client._segments.arenas.acquire(arena.name, arena.nbytes)
        try:
            ctypes.memmove(mapped.address + slot.offset, bytes(blob), len(blob))
        finally:
            client._segments.arenas.release(mapped)


def test_pages_round_trip_through_the_stores_arenas(client):
    pages = make_pages(9, seed=60)  # three sizes: a reservation per size
    keys = [key for key, _ in pages]
    assert client.put_encoded_pages(pages) == 9
    assert client._shm_puts.num_pages_copied == 9  # one copy each, no frames, no NIXL
    assert client.put_encoded_pages(pages) == 0  # present: a no-op
    assert client.get_pages(keys) == [blob for _, blob in pages]
    with client.get_pages_leased(keys, mapped=True) as lease:  # they lie in the arenas
        assert lease.valid_until is not None
        assert [bytes(p) for p in lease.pages] == [blob for _, blob in pages]
    # the caller's buffer is copied, not kept: changing it changes nothing stored
    caller = bytearray(pages[0][1])
    client.delete_pages(keys[:1])
    assert client.put_encoded_pages([(keys[0], caller)]) == 1
    caller[-1] ^= 0xFF
    assert client.get_pages(keys[:1]) == [pages[0][1]]


def test_a_corrupt_page_is_refused_at_commit_and_never_visible(client):
    pages = make_pages(3, seed=61, spaces=SPACES[:1])
    keys = [key for key, _ in pages]
    bad = bytearray(pages[1][1])
    bad[-1] ^= 0xFF
    with pytest.raises(InvalidRequest, match="page 1: page checksum mismatch"):
        client.put_encoded_pages([pages[0], (keys[1], bytes(bad)), pages[2]])
    assert client.has_pages(keys) == [False] * 3  # none of the call
    # a slot scribbled on after an intact page was copied in
    nbytes = len(pages[0][1])
    reply = reserve(client, 2, nbytes)
    write_slots(client, reply, [pages[0][1], bad])
    with pytest.raises(InvalidRequest, match="page 1: page checksum mismatch"):
        commit(client, reply.reservation_id, keys[:2])
    # intact bytes committed under another key: the header names its own key
    reply = reserve(client, 1, nbytes)
    write_slots(client, reply, [pages[0][1]])
    with pytest.raises(InvalidRequest, match="key"):
        commit(client, reply.reservation_id, [keys[2]])
    assert client.has_pages(keys) == [False] * 3
    assert client.put_encoded_pages(pages) == 3  # the slots went back: the good ones fit


def test_aborted_and_expired_reservations_free_their_slots_a_ttl_later(client):
    nbytes = len(make_pages(1, seed=62, spaces=SPACES[2:])[0][1])
    time.sleep(2 * TTL_S)  # earlier tests' cooling slots are free
    everything = reserve(client, 10_000, nbytes)
    num_slots = len(everything.slots)
    # bounded: the 4 MiB tier's slot budget (capacity plus one arena), not 10,000 slots
    assert 8 <= num_slots and num_slots * nbytes <= 2 * (4 << 20)
    assert reserve(client, 1, nbytes).reservation_id == 0  # none free while held
    reserved = time.monotonic()
    for end in ("abort", "expiry"):
        if end == "abort":  # the client's copy failed: a commit of no keys
            ended = time.monotonic()
            aborted = commit(client, everything.reservation_id, [])
            assert aborted.num_pages_stored == 0 and not aborted.is_expired
        else:  # left unused
            ended = reserved + TTL_S
            sleep_until(ended + 0.3 * TTL_S)
            assert commit(client, everything.reservation_id, [b"k" * 16]).is_expired
        sleep_until(ended + 0.5 * TTL_S)
        assert reserve(client, 1, nbytes).reservation_id == 0  # held one more TTL
        sleep_until(ended + 1.5 * TTL_S)
        everything, reserved = reserve(client, 10_000, nbytes), time.monotonic()
        assert len(everything.slots) == num_slots  # every slot free again
    commit(client, everything.reservation_id, [])


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def test_page_key_scope_and_tenants_hold(tmp_path, monkeypatch):
    token_file = _token_file(tmp_path, [
        {"token": ALICE_RW, "tenant": "alice", "access": "read-write"},
        {"token": BOB_RO, "tenant": "bob", "access": "read"},
    ])
    monkeypatch.setenv("KVMESH_STORE_TOKEN", INTERNAL)
    monkeypatch.setenv("KVMESH_STORE_TENANT_SECRET", SECRET)
    proc, target = start_store("--cpu-bytes", "4M", "--token-file", token_file)
    try:
        alice_ns = NS.with_salt(tenant_salt(SECRET, "alice"))
        keys = alice_ns.page_keys(TOKENS)
        payloads = kv_pages.kv_to_pages(KV, alice_ns, len(TOKENS))
        token_bytes = kv_pages.token_bytes(TOKENS, alice_ns)
        pages = [(key, encode_page(alice_ns, key, token_bytes[8 * i : 8 * (i + 1)], payload))
                 for i, (key, payload) in enumerate(zip(keys, payloads, strict=True))]
        with StoreClient(target, token=INTERNAL) as worker:  # a worker writes alice's pages
            assert worker.put_encoded_pages(pages) == 2
            assert worker._shm_puts.num_pages_copied == 2
        with StoreClient(target, token=ALICE_RW) as alice:
            got = alice.get_closest(TOKENS, NS)  # her own tenant's namespace, whatever it says
            assert got is not None and got.num_tokens == 4 and got.kv.equal(KV)
            with pytest.raises(PermissionDenied, match="internal token"):
                reserve(alice, 1, len(pages[0][1]))
            with pytest.raises(PermissionDenied):
                alice.put_encoded_pages(pages)
        with StoreClient(target, token=BOB_RO) as bob:
            assert bob.get_closest(TOKENS, NS) is None
            assert bob.lookup(TOKENS, alice_ns).num_tokens == 0  # the salt in the body: ignored
    finally:
        stop_store(proc)


def test_every_way_shared_memory_is_off_falls_back(client, store):
    pages = make_pages(4, seed=63)
    keys = [key for key, _ in pages]
    with StoreClient(store, shared_memory=False) as remote:  # as from another host
        assert remote._shm_puts is None
        assert remote.put_encoded_pages(pages[:2]) == 2  # by the frames
    proc, private = start_store("--cpu-bytes", "4M", "--no-shared-memory", "--data-plane", "grpc")
    try:
        with StoreClient(private) as local:
            assert local.put_encoded_pages(pages) == 4  # declined: by the frames
            assert local._shm_puts.num_pages_copied == 0 and local._shm_puts._calls_off > 0
            assert local.get_pages(keys) == [blob for _, blob in pages]
    finally:
        stop_store(proc)
    assert client.get_pages(keys[:2]) == [blob for _, blob in pages[:2]]


def test_arena_files_the_client_cannot_map_fall_back(client, monkeypatch):
    """A store whose arena files this client cannot open (another user's, say): the reservation
    is aborted, the pages go by the frames, and shared memory is not asked again for a while."""
    pages = make_pages(2, seed=64)
    real_acquire = client._segments.arenas.acquire

    def unreadable(name, nbytes):
        return real_acquire(name + "0" * 64, nbytes)  # a name that is not a segment

    monkeypatch.setattr(client._segments.arenas, "acquire", unreadable)
    assert client.put_encoded_pages(pages) == 2
    assert client._shm_puts.num_pages_copied == 0 and client._shm_puts._calls_off > 0
    monkeypatch.undo()
    assert client.get_pages([key for key, _ in pages]) == [blob for _, blob in pages]
