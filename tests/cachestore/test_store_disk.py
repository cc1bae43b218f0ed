"""TieredStore over the disk tier alone and under a CPU tier: restart, corruption, demotion."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from kvmesh.cachestore.codec import encode_page, header_nbytes
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.cachestore.tiers.disk import DiskTier

NS = Namespace("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
               page_size=4)
BLOB = header_nbytes(4) + NS.page_nbytes


def page_files(root) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file())


def test_round_trip_and_gap(tmp_path, pages):
    store = TieredStore([DiskTier(tmp_path, capacity_bytes=100 * BLOB)])
    tokens = pages.tokens(20)
    payloads = pages.payloads(NS, 5)
    assert store.put(NS, tokens, payloads) == 5
    assert store.put(NS, tokens, payloads) == 0
    assert len(page_files(tmp_path)) == 5
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 20 and got.tiers == ["disk"] * 5
    assert [bytes(p) for p in got.payloads] == payloads
    assert store.delete(NS, tokens, [3]) == 1
    assert len(page_files(tmp_path)) == 4
    assert store.get_closest(NS, tokens).num_tokens == 12
    assert store.lookup(NS, tokens).tiers == ["disk"] * 3


def test_restart_rebuilds_index_and_drops_partial_files(tmp_path, pages):
    tier = DiskTier(tmp_path, capacity_bytes=100 * BLOB)
    store = TieredStore([tier])
    tokens = pages.tokens(16)
    payloads = pages.payloads(NS, 4)
    store.put(NS, tokens, payloads)
    keys = NS.page_keys(tokens)
    # Leftovers of a crash: a tmp file of an interrupted write, a truncated page, an empty file
    # and a page whose file name is not its key.
    page3 = tier.path_of(keys[3])
    (page3.parent / (page3.name + ".1234.tmp")).write_bytes(page3.read_bytes()[:100])
    page3.write_bytes(page3.read_bytes()[:-1])
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / ("ab" * 16 + ".page")).write_bytes(b"")
    other = tier.path_of(b"\x01" * 16)
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(tier.path_of(keys[0]).read_bytes())
    store.close()

    reopened = DiskTier(tmp_path, capacity_bytes=100 * BLOB)
    assert reopened.num_dropped_at_start == 4
    assert reopened.stats().num_pages == 3 and reopened.stats().used_bytes == 3 * BLOB
    assert sorted(page_files(tmp_path)) == sorted(k.hex() + ".page" for k in keys[:3])
    store = TieredStore([reopened])
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 12 and [bytes(p) for p in got.payloads] == payloads[:3]


def test_restart_keeps_recency_order(tmp_path, pages):
    tier = DiskTier(tmp_path, capacity_bytes=100 * BLOB)
    store = TieredStore([tier])
    prompts = [pages.tokens(4, offset=i) for i in range(3)]
    keys = [NS.page_keys(p)[0] for p in prompts]
    for i, p in enumerate(prompts):
        store.put(NS, p, pages.payloads(NS, 1, offset=i))
        os.utime(tier.path_of(keys[i]), (1_000_000 + i, 1_000_000 + i))
    store.get_closest(NS, prompts[0])  # refreshes page 0's mtime to now
    assert tier.keys_lru_order() == [keys[1], keys[2], keys[0]]
    assert DiskTier(tmp_path, capacity_bytes=100 * BLOB).keys_lru_order() == [
        keys[1], keys[2], keys[0]]
    # A smaller capacity at restart keeps the most recent pages.
    assert DiskTier(tmp_path, capacity_bytes=2 * BLOB).keys_lru_order() == [keys[2], keys[0]]


@pytest.mark.parametrize("offset", [0, 20, header_nbytes(4) - 1, header_nbytes(4) + 7, BLOB - 1])
def test_flipped_byte_in_disk_file_is_a_miss_and_dropped(tmp_path, pages, offset):
    tier = DiskTier(tmp_path, capacity_bytes=100 * BLOB)
    store = TieredStore([tier])
    tokens = pages.tokens(12)
    payloads = pages.payloads(NS, 3)
    store.put(NS, tokens, payloads)
    keys = NS.page_keys(tokens)
    path = tier.path_of(keys[1])
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x80
    path.write_bytes(bytes(data))
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 4 and bytes(got.payloads[0]) == payloads[0]
    assert not path.exists()
    assert tier.contains_many(keys) == [True, False, True]
    assert store.stats()[0].errors == 1


def test_collision_on_disk_is_a_miss(tmp_path, pages):
    tier = DiskTier(tmp_path, capacity_bytes=100 * BLOB)
    store = TieredStore([tier])
    tokens = pages.tokens(4)
    key = NS.page_keys(tokens)[0]
    other_tokens = tokens_to_bytes(pages.tokens(4, offset=3))
    tier.put_many([(key, encode_page(NS, key, other_tokens, pages.payloads(NS, 1)[0]))])
    assert store.get_closest(NS, tokens) is None
    assert tier.contains_many([key]) == [False]


def test_demotion_cpu_to_disk_and_promotion_back(tmp_path, pages):
    cpu = CpuTier(capacity_bytes=2 * BLOB, pin_memory=False)
    disk = DiskTier(tmp_path, capacity_bytes=100 * BLOB)
    store = TieredStore([cpu, disk])
    tokens = pages.tokens(20)
    payloads = pages.payloads(NS, 5)
    keys = NS.page_keys(tokens)
    assert store.put(NS, tokens, payloads) == 5
    assert cpu.keys_lru_order() == keys[3:]  # the CPU tier keeps the 2 newest
    assert disk.keys_lru_order() == keys[:3]  # the 3 it evicted were demoted
    assert store.lookup(NS, tokens).tiers == ["disk"] * 3 + ["cpu"] * 2
    got = store.get_closest(NS, tokens)
    assert got.num_tokens == 20 and [bytes(p) for p in got.payloads] == payloads
    assert got.tiers == ["disk"] * 3 + ["cpu"] * 2
    # Hits from disk were promoted (the CPU tier now holds the last two promoted) and what they
    # pushed out of the CPU tier went back down; nothing was lost.
    assert cpu.keys_lru_order() == keys[1:3]
    assert set(disk.keys_lru_order()) == set(keys)
    assert store.get_closest(NS, tokens[:12]).tiers == ["disk", "cpu", "cpu"]
    s_cpu, s_disk = store.stats()
    # CPU evictions: 3 at put, 3 + 1 by the promotions of the two get_closest calls.
    assert (s_cpu.name, s_cpu.num_pages, s_cpu.evictions) == ("cpu", 2, 7)
    assert (s_disk.name, s_disk.num_pages, s_disk.evictions) == ("disk", 5, 0)


def test_demotion_chain_drops_only_at_the_bottom(tmp_path, pages):
    cpu = CpuTier(capacity_bytes=1 * BLOB, pin_memory=False)
    disk = DiskTier(tmp_path, capacity_bytes=2 * BLOB)
    store = TieredStore([cpu, disk])
    tokens = pages.tokens(16)
    keys = NS.page_keys(tokens)
    store.put(NS, tokens, pages.payloads(NS, 4))
    assert cpu.keys_lru_order() == [keys[3]]
    assert disk.keys_lru_order() == [keys[1], keys[2]]  # page 0 fell off the bottom
    assert store.get_closest(NS, tokens) is None  # page 0 is gone: no prefix
    assert store.get_closest(NS, tokens[4:]) is None  # other chain: other keys


def test_sixteen_threads_over_cpu_and_disk(tmp_path, pages):
    cpu = CpuTier(capacity_bytes=6 * BLOB, pin_memory=False)
    store = TieredStore([cpu, DiskTier(tmp_path, capacity_bytes=1000 * BLOB)])
    prompts = [pages.tokens(12, offset=t) for t in range(16)]
    expected = [pages.payloads(NS, 3, offset=t) for t in range(16)]
    errors: list[str] = []

    def worker(t: int) -> None:
        for _ in range(6):
            store.put(NS, prompts[t], expected[t])
            got = store.get_closest(NS, prompts[t])
            num_pages = 0 if got is None else got.num_tokens // NS.page_size
            if got is not None and [bytes(p) for p in got.payloads] != expected[t][:num_pages]:
                errors.append(f"thread {t}: wrong payloads")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for t in range(16):  # nothing lost: every page is in the CPU tier or on disk, intact
        got = store.get_closest(NS, prompts[t])
        assert [bytes(p) for p in got.payloads] == expected[t]
    assert not list(tmp_path.rglob("*.tmp"))
    assert cpu.stats().num_pages == 6


def test_disk_gone_degrades_to_miss(tmp_path, pages):
    root = tmp_path / "pages"
    cpu = CpuTier(capacity_bytes=2 * BLOB, pin_memory=False)
    store = TieredStore([cpu, DiskTier(root, capacity_bytes=100 * BLOB)])
    tokens = pages.tokens(16)
    assert store.put(NS, tokens, pages.payloads(NS, 4)) == 4  # pages 0-1 on disk
    shutil.rmtree(root)  # the disk goes away under the running store
    assert store.get_closest(NS, tokens) is None  # page 0 was on disk
    other = pages.tokens(12, offset=1)
    assert store.put(NS, other, pages.payloads(NS, 3, offset=1)) == 2  # page 0 had nowhere to go
    s_cpu, s_disk = store.stats()  # the failed write marked the disk down ...
    assert s_cpu.is_available and not s_disk.is_available and s_disk.errors == 1
    assert store.get_closest(NS, other) is None
    assert store.lookup(NS, other).num_tokens == 0
    assert store.stats()[1].is_available  # ... until its next call (an index lookup) answered


@pytest.mark.gpu
def test_pinned_cpu_tier_over_disk_on_cuda(tmp_path, pages):
    torch = pytest.importorskip("torch")
    assert torch.cuda.is_available(), "gpu test needs CUDA"
    cpu = CpuTier(capacity_bytes=2 * BLOB)  # pinned by default with CUDA present
    assert cpu.is_pinned
    store = TieredStore([cpu, DiskTier(tmp_path, capacity_bytes=100 * BLOB)])
    tokens = pages.tokens(16)
    payloads = pages.payloads(NS, 4)
    assert store.put(NS, tokens, payloads) == 4  # pinned pages 0-1 demoted to disk
    got = store.get_closest(NS, tokens)
    assert got.tiers == ["disk", "disk", "cpu", "cpu"]
    assert [bytes(p) for p in got.payloads] == payloads
    assert all(p.readonly for p in got.payloads)
    # pages 2-3 are views into pinned host memory: one async copy each to the GPU
    kv = [torch.frombuffer(p, dtype=torch.float16).view(NS.page_shape) for p in got.payloads[2:]]
    assert all(t.is_pinned() for t in kv)
    on_gpu = [t.to("cuda", non_blocking=True) for t in kv]
    torch.cuda.synchronize()
    # compare bit patterns: random bytes as float16 include NaNs
    assert all(torch.equal(g.cpu().view(torch.int16), t.view(torch.int16))
               for g, t in zip(on_gpu, kv, strict=True))
    assert store.get_closest(NS, tokens).tiers == ["cpu", "cpu", "disk", "disk"]


def test_flush_down_copies_the_cpu_tier_to_disk_in_lru_order(tmp_path, pages):
    """A graceful stop's flush: every cpu page the disk lacks is copied, oldest first, so a
    restarted disk tier finds them in the same recency order; with no time left, none is."""
    cpu = CpuTier(capacity_bytes=100 * BLOB, pin_memory=False)
    disk = DiskTier(tmp_path, capacity_bytes=200 * BLOB)
    store = TieredStore([cpu, disk])
    tokens = pages.tokens(4 * 150)
    payloads = pages.payloads(NS, 150)
    assert store.put(NS, tokens[:40], payloads[:10]) == 10
    assert cpu.stats().num_pages == 10 and disk.stats().num_pages == 0
    timed_out = store.flush_down(timeout_s=0)
    assert (timed_out.num_flushed, timed_out.num_left) == (0, 10) and page_files(tmp_path) == []
    assert store.put(NS, tokens, payloads) == 140  # 150 pages in a 100-page cpu tier
    assert cpu.stats().num_pages == 100 and disk.stats().num_pages == 50
    order = cpu.keys_lru_order()
    result = store.flush_down(timeout_s=60)
    assert (result.num_flushed, result.num_already_below, result.num_left) == (100, 0, 0)
    assert cpu.keys_lru_order() == order  # the cpu tier is left as it was
    assert disk.keys_lru_order()[50:] == order
    assert store.flush_down(timeout_s=60).num_already_below == 100
    store.close()
    restarted = TieredStore([CpuTier(capacity_bytes=100 * BLOB, pin_memory=False),
                             DiskTier(tmp_path, capacity_bytes=200 * BLOB)])
    got = restarted.get_closest(NS, tokens)
    assert got.num_tokens == 4 * 150 and [bytes(p) for p in got.payloads] == payloads
