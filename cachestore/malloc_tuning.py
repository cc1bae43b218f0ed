"""Keep freed page buffers in the process instead of handing them back to the kernel.

Every page a tier reads (disk, Redis) or encodes (put) is a fresh 0.4-2 MB buffer. With glibc's
defaults such buffers are mmap'ed or trimmed off the heap when freed, so the next request pays
a page fault per 4 KiB touching new memory: on the 2-core VM this project targets, reading 32
disk pages and keeping them ran at 0.5-0.7 GB/s against 2.5-3 GB/s once freed memory is kept
for reuse (benchmarks/tiers_bench.py --tune-malloc shows it per tier).

`keep_freed_memory()` sets glibc's M_MMAP_THRESHOLD (32 MiB: pages come from the heap),
M_TRIM_THRESHOLD (1 GiB: the heap is not trimmed) and M_TOP_PAD (64 MiB). It is process-wide,
so a server calls it once at start; elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                      top_pad: int = 64 << 20) -> bool:
    """Tune glibc malloc for large short-lived buffers; returns whether it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, top_pad)))
