"""CpuTier on its own: LRU by bytes, evictions returned, stats, pinned memory on CUDA."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from cachestore.errors import InvalidConfig
from cachestore.tiers.cpu import CpuTier


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
    on_gpu = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), torch.frombuffer(bytearray(data), dtype=torch.uint8))


def test_keep_freed_memory_takes_effect_on_glibc():
    code = ("from cachestore.malloc_tuning import keep_freed_memory; "
            "print(keep_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert out.stdout.strip() == expected
