"""CpuTier on its own: LRU by bytes, evictions returned, stats, pinned memory on CUDA."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.tiers.cpu import CpuTier


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_lru_by_bytes_and_evictions_returned_oldest_first():
    tier = CpuTier(capacity_bytes=300, pin_memory=False)
    assert tier.put_many([(key(1), b"a" * 100), (key(2), b"b" * 100), (key(3), b"c" * 100)]) == []
    assert tier.get_many([key(1), key(9)]) == [b"a" * 100, None]  # key 1 becomes newest
    evicted = tier.put_many([(key(4), b"d" * 150)])  # needs 50 more: the two oldest go
    assert evicted == [(key(2), b"b" * 100), (key(3), b"c" * 100)]
    assert tier.keys_lru_order() == [key(1), key(4)]
    assert tier.contains_many([key(1), key(2), key(3), key(4)]) == [True, False, False, True]
    s = tier.stats()
    assert (s.name, s.used_bytes, s.capacity_bytes, s.num_pages) == ("cpu", 250, 300, 2)
    assert (s.hits, s.misses, s.evictions, s.errors, s.is_available) == (1, 1, 2, 0, True)


def test_reput_is_a_noop_that_refreshes_recency():
    tier = CpuTier(capacity_bytes=1000, pin_memory=False)
    tier.put_many([(key(1), b"x" * 10), (key(2), b"y" * 10)])
    assert tier.put_many([(key(1), b"other")]) == []
    assert tier.get_many([key(1)]) == [b"x" * 10]  # first write wins, never overwritten
    assert tier.keys_lru_order() == [key(2), key(1)]
    assert tier.stats().used_bytes == 20


def test_contains_does_not_touch_recency():
    tier = CpuTier(capacity_bytes=1000, pin_memory=False)
    tier.put_many([(key(1), b"x"), (key(2), b"y")])
    tier.contains_many([key(1)])
    assert tier.keys_lru_order() == [key(1), key(2)]


def test_oversized_page_is_returned_not_stored():
    tier = CpuTier(capacity_bytes=10, pin_memory=False)
    tier.put_many([(key(1), b"x" * 10)])
    assert tier.put_many([(key(2), b"y" * 11)]) == [(key(2), b"y" * 11)]
    assert tier.keys_lru_order() == [key(1)]


def test_reader_keeps_a_valid_page_after_eviction_and_delete():
    tier = CpuTier(capacity_bytes=100, pin_memory=False)
    tier.put_many([(key(1), b"a" * 100)])
    page = memoryview(tier.get_many([key(1)])[0])
    tier.put_many([(key(2), b"b" * 100)])  # evicts key 1
    assert tier.delete_many([key(1), key(2)]) == 1
    assert bytes(page) == b"a" * 100


def test_memoryview_input_is_copied():
    tier = CpuTier(capacity_bytes=100, pin_memory=False)
    buf = bytearray(b"abc")
    tier.put_many([(key(1), memoryview(buf))])
    buf[0] = ord("z")
    assert bytes(tier.get_many([key(1)])[0]) == b"abc"


def test_invalid_capacity():
    with pytest.raises(InvalidConfig, match="positive"):
        CpuTier(capacity_bytes=0)


def slot_address(page) -> int:
    import numpy as np

    return np.frombuffer(page, dtype=np.uint8).ctypes.data


def test_pages_of_one_size_share_an_arena_in_consecutive_slots():
    """Slots as on CUDA (there page-locked): exact-size slots, not one allocation per page."""
    tier = CpuTier(capacity_bytes=1000, pin_memory=False, slots=True)
    pages = [(key(i), bytes([i]) * 96) for i in range(4)] + [(key(9), b"z" * 40)]
    assert tier.put_many(pages) == []
    got = tier.get_many([k for k, _ in pages])
    assert [bytes(p) for p in got] == [data for _, data in pages]
    assert all(isinstance(p, memoryview) and p.readonly for p in got)
    addresses = [slot_address(p) for p in got[:4]]
    assert addresses == [addresses[0] + 96 * i for i in range(4)]
    assert tier._slots.num_arenas == 2  # one per page size


def test_pages_stored_after_a_delete_take_the_freed_slots_in_ascending_order():
    """Deleted in order, the slots come back lowest first: a prefix stored again lies in
    consecutive ascending slots (one 2-D copy to the device), not reversed."""
    tier = CpuTier(capacity_bytes=1000, pin_memory=False, slots=True)
    first = [(key(i), bytes([i]) * 96) for i in range(6)]
    tier.put_many([(key(99), b"k" * 96), *first])  # key 99 keeps the arena from going
    start = slot_address(tier.get_many([key(0)])[0])
    tier.delete_many([k for k, _ in first])
    again = [(key(10 + i), bytes([i]) * 96) for i in range(6)]
    tier.put_many(again)
    pages, addresses = tier.get_leading_addressed([k for k, _ in again])
    assert addresses == [start + 96 * i for i in range(6)]


def test_leading_pages_come_with_their_slot_addresses_up_to_the_first_missing():
    tier = CpuTier(capacity_bytes=1000, pin_memory=False, slots=True)
    tier.put_many([(key(i), bytes([i]) * 96) for i in (0, 1, 2, 4)])
    pages, addresses = tier.get_leading_addressed([key(0), key(1), key(2), key(3), key(4)])
    assert [bytes(p) for p in pages] == [bytes([i]) * 96 for i in range(3)]
    assert addresses == [slot_address(p) for p in pages]
    assert tier.keys_lru_order() == [key(4), key(0), key(1), key(2)]  # the found ones touched
    assert (tier.stats().hits, tier.stats().misses) == (3, 0)  # a prefix ending is no miss
    assert tier.get_leading_addressed([key(3), key(0)]) == ([], [])


def test_arenas_of_a_page_size_start_small_and_double():
    """Each arena fills the power of two that torch's pinned allocator would round it up to."""
    tier = CpuTier(capacity_bytes=1 << 20, pin_memory=False, slots=True)
    tier.put_many([(key(i), bytes([i % 256]) * 100) for i in range(10 + 20 + 1)])
    assert [a.count for a in tier._slots._by_size[100]] == [10, 20, 40]  # 1, 2, 4 KiB
    tier.put_many([(key(999), b"q" * 64)])  # a size seen once holds 512 bytes, not megabytes
    assert [a.count for a in tier._slots._by_size[64]] == [8]


def test_arenas_stay_within_the_capacity_plus_one_arena():
    """Pages of many sizes (a store's clients may send any): past the budget a page is kept
    as its own buffer; every page still reads back."""
    tier = CpuTier(capacity_bytes=1000, pin_memory=False, slots=True)
    pages = [(key(i), bytes([i]) * (50 + i)) for i in range(12)]
    for page in pages:  # one at a time: the LRU keeps what fits in 1000 bytes
        tier.put_many([page])
        assert tier._slots.nbytes <= 1000 + 1024
    kept = [(k, data) for k, data in pages if tier.contains_many([k])[0]]
    got = tier.get_many([k for k, _ in kept])
    assert [bytes(p) for p in got] == [data for _, data in kept]
    assert any(isinstance(p, bytes) for p in got)  # found no slot within the budget


def test_a_slot_is_reused_only_after_its_last_reader_lets_go():
    import gc

    tier = CpuTier(capacity_bytes=200, pin_memory=False, slots=True)
    tier.put_many([(key(1), b"a" * 100), (key(2), b"b" * 100)])
    held = tier.get_many([key(1)])[0]
    address = slot_address(held)
    for i in range(3, 12):  # every older page is evicted, key 1 among them
        tier.put_many([(key(i), bytes([i]) * 100)])
        assert bytes(held) == b"a" * 100  # never overwritten under its reader
        assert slot_address(tier.get_many([key(i)])[0]) != address
    assert tier.contains_many([key(1)]) == [False]
    del held
    gc.collect()
    tier.put_many([(key(12), b"l" * 100)])
    assert slot_address(tier.get_many([key(12)])[0]) == address  # free again: reused first


def test_an_arena_whose_slots_are_all_free_is_kept_and_reused():
    """Arenas live until close (registered memory stays put): freed slots are handed out again,
    and an idle arena is cut again for another page size once the budget allows no new one."""
    tier = CpuTier(capacity_bytes=10_000, pin_memory=False, slots=True)
    made = []
    tier.on_new_arena = lambda *arena: made.append(arena)
    tier.put_many([(key(i), bytes([i]) * 1000) for i in range(8)])
    assert tier.arenas() == made and len(made) == 1
    (arena_id, address, nbytes), = made
    assert nbytes == 8 * 1000  # a plain arena is exactly its slots
    page = tier.get_many([key(3)])[0]
    tier.delete_many([key(i) for i in range(8)])
    del page
    assert tier._slots.num_free_slots == 8 and tier.arenas() == made  # empty, not freed
    tier.put_many([(key(10), b"x" * 1000)])
    assert slot_address(tier.get_many([key(10)])[0]) == address  # the same memory again
    tier.delete_many([key(10)])
    # 1,250-byte pages: their own arenas until the budget (capacity + one 16 KiB arena) is
    # spent, then the idle 1,000-byte arena is cut into 1,250-byte slots
    tier.put_many([(key(20 + i), bytes([i]) * 1250) for i in range(6)])
    assert [bytes(p) for p in tier.get_many([key(20 + i) for i in range(6)])] == [
        bytes([i]) * 1250 for i in range(6)]
    assert tier._slots.nbytes <= tier._slots.budget and len(made) == len(tier.arenas())
    tier.put_many([(key(40 + i), bytes([i]) * 1250) for i in range(8)])  # evicts: LRU of 10 kB
    assert tier._slots.nbytes <= tier._slots.budget
    assert all(isinstance(p, memoryview) for p in tier.get_many(tier.keys_lru_order()))
    assert any(a.slot_nbytes == 1250 and a.arena_id == arena_id
               for a in tier._slots._arenas)  # recut, not freed and made again

@pytest.mark.gpu
def test_pinned_pages_on_cuda():
    torch = pytest.importorskip("torch")
    assert torch.cuda.is_available(), "gpu test needs CUDA"
    tier = CpuTier(capacity_bytes=1 << 20)
    assert tier.is_pinned  # default with CUDA present
    data = bytes(range(256)) * 16
    tier.put_many([(key(1), data)])
    page = tier.get_many([key(1)])[0]
    assert bytes(page) == data
    assert page.readonly  # like bytes pages: no reader can change a stored page
    host = torch.frombuffer(page, dtype=torch.uint8)  # warns: read-only buffer
    assert host.is_pinned()
    tier.put_many([(key(2), data), (key(3), data)])
    first, second = tier.get_many([key(2), key(3)])
    assert slot_address(second) == slot_address(first) + len(data)  # slots of one arena
    on_gpu = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), torch.frombuffer(bytearray(data), dtype=torch.uint8))


def test_keep_freed_memory_takes_effect_on_glibc():
    code = ("from kvmesh.cachestore.malloc import keep_freed_memory; "
            "print(keep_freed_memory())")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         check=True)
    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert out.stdout.strip() == expected
