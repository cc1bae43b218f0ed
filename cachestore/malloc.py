"""Keep freed memory in the process (glibc malloc tuning) for bulk page traffic.

Every request moves megabytes through short-lived buffers (received frames, encoded pages, KV
tensors). With glibc's defaults the freed top of the heap is trimmed back to the OS and large
blocks are mmapped afresh, so the next request page-faults the same memory in again; on the 2-core
VM of benchmarks/RESULTS.md that fault path cost more CPU than the copies themselves (client
get_closest: ~1.7 -> ~0.9 CPU-s per GB). The process owner opts in: `kvmesh store` does, a
library import never does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(trim_threshold: int = 1 << 30, top_pad: int = 64 << 20,
                        mmap_threshold: int = 32 << 20) -> bool:
    """Ask glibc to keep up to `trim_threshold` bytes of freed heap, grow the heap by `top_pad`
    at a time, and serve blocks below `mmap_threshold` from the heap. Returns False (and
    changes nothing) where malloc is not glibc's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, top_pad)))
