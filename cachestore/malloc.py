"""Keep freed memory in the process (glibc malloc tuning) for bulk page traffic.

Every request moves megabytes through short-lived buffers (received frames, encoded pages, KV
tensors; a page a tier reads or encodes is a fresh 0.4-2 MB buffer). With glibc's defaults such
buffers are mmapped afresh or trimmed off the heap when freed, so the next request page-faults
the same memory in again. On the 2-core VM of benchmarks/RESULTS.md that fault path cost more
CPU than the copies themselves: client get_closest ~1.7 -> ~0.9 CPU-s per GB
(benchmarks/store_bench.py), reading 32 disk pages 0.5-0.7 -> 2.5-3 GB/s
(benchmarks/tiers_bench.py --tune-malloc).

`keep_freed_memory()` sets glibc's M_MMAP_THRESHOLD (32 MiB: pages come from the heap),
M_TRIM_THRESHOLD (64 MiB of free heap top kept), M_TOP_PAD (16 MiB) and M_ARENA_MAX (2). It is
process-wide, so the process owner opts in once at start: `kvmesh store` does, a library import
never does.

Kept memory must stay bounded, though (a store's RSS is capacity x 1.15 + 300 MB at most,
tests/cachestore/test_store_memory.py): grpc runs each call on a thread of a 32-thread pool, and
glibc gives threads up to 8 x cores malloc arenas, each growing to its own peak and (with a 1 GiB
trim threshold, as before) never shrinking. A 512 MB store under three 64 MB put streams peaked
at 1.0 GB RSS that way, 0.84-0.88 GB with two arenas and a 64 MiB threshold, at the same speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20,
                      top_pad: int = 16 << 20, arena_max: int = 2) -> bool:
    """Ask glibc to serve blocks below `mmap_threshold` from the heap, keep up to
    `trim_threshold` bytes of freed heap top, grow the heap by `top_pad` at a time, and share
    at most `arena_max` malloc arenas between all threads. Returns whether it took effect;
    changes nothing where malloc is not glibc's (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, top_pad), (_M_ARENA_MAX, arena_max)))
