"""StoreClient.put_pages_from against a real `kvmesh store` process: pages given as (key, token
ids, payload) are encoded straight into the store's shared-memory slots, in pipelined batches,
and stored byte for byte as encode_page writes them; a page corrupted in its slot is still
refused at commit (its batch not stored, later batches not sent); pages of the wrong size are
refused before anything moves; without shared memory (off, or declined by the store) they are
encoded and go by the frames."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from test_store_hardening import start_store, stop_store

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.client import shm_puts, slot_fill
from kvmesh.cachestore.codec import encode_page, page_nbytes, payload_offset
from kvmesh.cachestore.errors import InvalidRequest

NS = Namespace("from-slots", num_layers=3, num_kv_heads=2, head_dim=24, dtype=torch.float16,
               page_size=4)


@pytest.fixture(scope="module")
def store():
    proc, target = start_store("--cpu-bytes", "8M", "--data-plane", "grpc")
    yield target
    stop_store(proc)


@pytest.fixture
def client(store):
    with StoreClient(store) as c:
        yield c


@pytest.fixture
def batches_of_three(monkeypatch):
    """Reservations of 3 pages: 10 pages go in 4 pipelined batches."""
    monkeypatch.setattr(shm_puts, "BATCH_NBYTES", 3 * page_nbytes(NS))


def payload_pages(num_pages: int, seed: int) -> list[tuple[bytes, bytes, memoryview]]:
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(rng.standard_normal((num_pages, *NS.page_shape)).astype(np.float16))
    tokens = rng.integers(0, 50_000, num_pages * NS.page_size, dtype=np.int32).tolist()
    return [(key, np.array(tokens[NS.page_size * i : NS.page_size * (i + 1)], "<i4").tobytes(),
             memoryview(rows[i].view(torch.uint8).numpy()))
            for i, key in enumerate(NS.page_keys(tokens))]


def encoded(pages) -> list[bytes]:
    return [encode_page(NS, key, token_ids, payload) for key, token_ids, payload in pages]


def test_pages_are_encoded_in_their_slots_as_encode_page_writes_them(client, batches_of_three):
    pages = payload_pages(10, seed=1)
    keys = [key for key, _, _ in pages]
    assert client.put_pages_from(NS, pages) == 10
    assert client._shm_puts.num_pages_copied == 10  # every page through the slots
    assert client.get_pages(keys) == encoded(pages)
    assert client.put_pages_from(NS, pages) == 0  # present: a no-op
    client.delete_pages(keys)


def test_a_page_corrupted_in_its_slot_is_refused(client, batches_of_three, monkeypatch):
    """Page 4 (the second batch's second) gets a payload byte flipped after it was written and
    hashed: the store refuses that batch, the first stays stored, the rest are never sent."""
    pages = payload_pages(10, seed=2)
    keys = [key for key, _, _ in pages]
    fill = slot_fill.PayloadPages.fill

    def fill_then_scribble(self, start, addresses):
        fill(self, start, addresses)
        if start <= 4 < start + len(addresses):
            byte = ctypes.c_uint8.from_address(addresses[4 - start] + payload_offset(NS) + 7)
            byte.value ^= 0x10

    monkeypatch.setattr(slot_fill.PayloadPages, "fill", fill_then_scribble)
    with pytest.raises(InvalidRequest, match="page 1: page checksum mismatch"):
        client.put_pages_from(NS, pages)
    assert client.has_pages(keys) == [True] * 3 + [False] * 7
    monkeypatch.setattr(slot_fill.PayloadPages, "fill", fill)
    assert client.put_pages_from(NS, pages) == 7  # the rest, in new slots
    assert client.get_pages(keys) == encoded(pages)
    client.delete_pages(keys)


@pytest.mark.parametrize("shared_memory", [None, False])
def test_pages_of_the_wrong_size_are_refused_before_anything_moves(store, shared_memory):
    pages = payload_pages(3, seed=3)
    key, token_ids, payload = pages[1]
    with StoreClient(store, shared_memory=shared_memory) as client:
        for bad in [(key[:15], token_ids, payload), (key, token_ids[:-4], payload),
                    (key, token_ids, payload[:-2])]:
            with pytest.raises(InvalidRequest, match="16-byte key, 4 int32 token ids and 2304"):
                client.put_pages_from(NS, [pages[0], bad, pages[2]])
        assert client.has_pages([key for key, _, _ in pages]) == [False] * 3


def test_without_shared_memory_pages_are_encoded_and_go_by_the_frames(store):
    pages = payload_pages(5, seed=4)
    keys = [key for key, _, _ in pages]
    with StoreClient(store, shared_memory=False) as remote:  # as from another host
        assert remote._shm_puts is None
        assert remote.put_pages_from(NS, pages[:2]) == 2
        assert remote.get_pages(keys[:2]) == encoded(pages[:2])
        remote.delete_pages(keys[:2])
    proc, private = start_store("--cpu-bytes", "4M", "--no-shared-memory", "--data-plane", "grpc")
    try:
        with StoreClient(private) as local:
            assert local.put_pages_from(NS, pages) == 5  # declined: encoded, by the frames
            assert local._shm_puts.num_pages_copied == 0 and local._shm_puts._calls_off > 0
            assert local.get_pages(keys) == encoded(pages)
    finally:
        stop_store(proc)
