"""Shared-memory GetPages parts without a server: the client's segment pool (reservations, retry
with a bigger segment, then inline; failed segments dropped), the writer declining remote peers,
which targets count as local, and the StoreConfig switch."""

from __future__ import annotations

import os

import pytest

from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.shm import client as shm_client
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.server import SegmentWriter
from kvmesh.v1 import store_pb2


def as_bytes(pages: list) -> list[bytes | None]:
    return [None if p is None else bytes(p) for p in pages]


def test_a_pool_closed_during_a_reservation_leaves_no_file(tmp_path, monkeypatch):
    pool = shm_client.SegmentPool(shm_dir=str(tmp_path))
    create = segments.create_segment

    def create_then_close(nbytes, shm_dir):
        segment = create(nbytes, shm_dir)
        pool.close()  # as an engine closing while its reservation thread runs
        return segment

    monkeypatch.setattr(segments, "create_segment", create_then_close)
    pool.reserve(1 << 20)
    assert list(tmp_path.iterdir()) == [] and pool.segment_names == []


def test_a_failed_reservation_changes_nothing(tmp_path, monkeypatch):
    """No room in /dev/shm for the big segment: logged; later gets still try shared memory."""
    pool = shm_client.SegmentPool(shm_dir=str(tmp_path))

    def no_room(nbytes, shm_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segments, "create_segment", no_room)
    pool.reserve(1 << 30)
    assert pool._calls_inline == 0 and pool._reserved.is_set() and pool.segment_names == []
    pool.close()


def test_pool_retries_then_goes_inline_and_discards_failed_segments():
    pool = shm_client.SegmentPool()
    sent = []

    def always_too_small(keys, segment, accept_mapped):
        sent.append(segment)
        if segment is not None:
            header = store_pb2.GetPagesHeader(
                is_found=[True], page_nbytes=[10], segment_nbytes_needed=segment.capacity + 1
            )
            return header, []
        return store_pb2.GetPagesHeader(is_found=[True], page_nbytes=[10]), [memoryview(b"x" * 10)]

    lease = pool.read(always_too_small, [b"k" * 16])
    assert not lease.is_shared_memory and as_bytes(lease.pages) == [b"x" * 10]
    assert sent[0] is not None and sent[1].capacity > sent[0].capacity and sent[2] is None

    def broken(keys, segment, accept_mapped):
        raise ConnectionError("call failed")

    names = pool.segment_names
    with pytest.raises(ConnectionError):
        pool.read(broken, [b"k" * 16])  # the server may still write into that segment: dropped
    (gone,) = set(names) - set(pool.segment_names)
    assert not os.path.exists(os.path.join(segments.SHM_DIR, gone))
    pool.close()
    assert not any(os.path.exists(os.path.join(segments.SHM_DIR, n)) for n in names)


def test_remote_peer_is_declined():
    writer = SegmentWriter()
    segment = store_pb2.SharedMemorySegment(name="kvmesh-00", capacity=1 << 20)
    for peer in ("ipv4:10.1.2.3:4567", "ipv6:[2001:db8::1]:80", "ipv4:128.0.0.1:1"):
        assert writer.write_pages(segment, [b"x" * 10], peer) is None
    writer.close()
    for peer in ("ipv4:127.0.0.1:5", "ipv6:[::1]:5", "unix:/tmp/s", "ipv6:%5B::1%5D:5"):
        assert segments.is_local_peer(peer)
    for target in (
        "127.0.0.1:50051",
        "localhost:1",
        "[::1]:2",
        "unix:/tmp/sock",
        "dns:///localhost:3",
    ):
        assert segments.is_local_target(target), target
    for target in ("10.0.0.1:50051", "store.example.com:1", "[2001:db8::1]:2"):
        assert not segments.is_local_target(target), target


def test_store_config_shared_memory_from_env_and_flags():
    assert StoreConfig().shared_memory is True
    assert StoreConfig.from_sources(env={"KVMESH_STORE_SHARED_MEMORY": "0"}).shared_memory is False
    assert StoreConfig.from_sources({"shared_memory": False}, env={}).shared_memory is False
    from kvmesh.cachestore.errors import InvalidConfig

    with pytest.raises(InvalidConfig):
        StoreConfig.from_sources(env={"KVMESH_STORE_SHARED_MEMORY": "maybe"})
