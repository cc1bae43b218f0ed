"""DiskTier on its own: files, atomic writes, LRU by bytes, restart, evictions read back."""

from __future__ import annotations

import errno
import os

import pytest

from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.cachestore.tiers.disk import DiskTier

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", page_size=2)


def page(i: int) -> tuple[bytes, bytes]:
    """A valid encoded page (the tier rebuilds its index from headers) with key from tokens."""
    tokens = [i, i + 1]
    key = NS.page_keys(tokens)[0]
    return key, encode_page(NS, key, tokens_to_bytes(tokens), bytes([i % 256]) * NS.page_nbytes)


def test_a_subdirectory_made_by_another_writer_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Two threads writing the first pages of one subdirectory both find it missing; the one
    that makes it second must still store its page (it used to fail the put: a lost page)."""
    real_mkdir = os.mkdir

    def another_writer_first(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        raise FileExistsError(errno.EEXIST, "File exists", path)

    monkeypatch.setattr(os, "mkdir", another_writer_first)
    tier = DiskTier(tmp_path, capacity_bytes=10 * len(page(0)[1]))
    key, blob = page(0)
    assert tier.put_many([(key, blob)]) == []
    assert tier.get_many([key]) == [blob]


def test_files_lru_and_evictions_read_back(tmp_path):
    p = [page(i) for i in range(4)]
    size = len(p[0][1])
    tier = DiskTier(tmp_path, capacity_bytes=3 * size)
    assert tier.put_many(p[:3]) == []
    path0 = tier.path_of(p[0][0])
    assert path0 == tmp_path / p[0][0].hex()[:2] / (p[0][0].hex() + ".page")
    assert path0.read_bytes() == p[0][1]
    assert tier.get_many([p[0][0]]) == [p[0][1]]
    assert tier.put_many([p[3]]) == [p[1]]  # oldest after the hit on page 0
    assert not tier.path_of(p[1][0]).exists()
    assert tier.keys_lru_order() == [p[2][0], p[0][0], p[3][0]]
    assert tier.put_many([p[2]]) == []  # present: no-op, refreshed
    assert tier.keys_lru_order() == [p[0][0], p[3][0], p[2][0]]
    s = tier.stats()
    assert (s.name, s.num_pages, s.used_bytes, s.evictions, s.hits) == ("disk", 3, 3 * size, 1, 1)
    assert tier.delete_many([p[0][0], p[1][0]]) == 1
    assert sorted(f.name for f in tmp_path.rglob("*.page")) == sorted(
        k.hex() + ".page" for k, _ in (p[2], p[3]))
    assert not list(tmp_path.rglob("*.tmp"))


def test_last_tier_need_not_read_evictions(tmp_path):
    p = [page(i) for i in range(2)]
    tier = DiskTier(tmp_path, capacity_bytes=len(p[0][1]), read_evicted=False)
    tier.put_many([p[0]])
    assert tier.put_many([p[1]]) == []
    assert tier.contains_many([p[0][0], p[1][0]]) == [False, True]


def test_file_removed_by_hand_is_a_miss(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=1 << 20)
    key, blob = page(1)
    tier.put_many([(key, blob)])
    tier.path_of(key).unlink()
    assert tier.get_many([key]) == [None]
    assert tier.contains_many([key]) == [False]
    assert tier.stats().used_bytes == 0


def test_restart_rebuilds_from_headers(tmp_path):
    p = [page(i) for i in range(3)]
    DiskTier(tmp_path, capacity_bytes=1 << 20).put_many(p)
    tier = DiskTier(tmp_path, capacity_bytes=1 << 20)
    assert tier.num_dropped_at_start == 0
    assert tier.contains_many([k for k, _ in p]) == [True] * 3
    assert tier.get_many([p[2][0]]) == [p[2][1]]


def test_garbage_file_dropped_at_start(tmp_path):
    key, _ = page(1)
    sub = tmp_path / key.hex()[:2]
    sub.mkdir()
    (sub / (key.hex() + ".page")).write_bytes(b"KVMP" + b"\0" * 200)
    (sub / "notes.txt").write_text("not a page")
    (tmp_path / "stray.txt").write_text("not a page dir")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.page").write_bytes(b"not ours")
    tier = DiskTier(tmp_path, capacity_bytes=1 << 20)
    assert tier.num_dropped_at_start == 1 and tier.stats().num_pages == 0
    assert not (sub / (key.hex() + ".page")).exists()
    # What this tier did not write is left alone.
    assert (sub / "notes.txt").exists() and (tmp_path / "stray.txt").exists()
    assert (tmp_path / "data" / "x.page").exists()


def test_invalid_config(tmp_path):
    with pytest.raises(InvalidConfig, match="positive"):
        DiskTier(tmp_path, capacity_bytes=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidConfig, match="cannot create"):
        DiskTier(tmp_path / "file" / "sub", capacity_bytes=10)
