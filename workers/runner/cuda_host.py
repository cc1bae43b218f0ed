"""Host-memory helpers the CUDA runtime offers and torch does not expose: one
`cudaMemcpyAsync` per page (no tensor objects per page), and page-locking memory we did not
allocate (`cudaHostRegister`, for the store's shared-memory segments), so the GPU reads it by DMA.

Both go through the CUDA runtime library torch itself loaded (found in /proc/self/maps), called
with ctypes. Where it cannot be found (a CPU build, a statically linked runtime), `cudart()` is
None and callers keep their torch paths.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

_COPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the (unified) addresses
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every context
_lib: ctypes.CDLL | None = None
_lib_searched = False
_lib_lock = threading.Lock()


def cudart() -> ctypes.CDLL | None:
    """The process's CUDA runtime library, once CUDA is initialized; else None."""
    global _lib, _lib_searched
    with _lib_lock:
        if _lib_searched:
            return _lib
        if not torch.cuda.is_available():
            return None
        torch.cuda.init()
        _lib_searched = True
        try:
            with open("/proc/self/maps") as maps:
                paths = sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_int, ctypes.c_void_p]
            lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                              ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                                              ctypes.c_int, ctypes.c_void_p]
            lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
            for fn in (lib.cudaMemcpyAsync, lib.cudaMemcpy2DAsync, lib.cudaHostRegister,
                       lib.cudaHostUnregister, lib.cudaGetLastError):
                fn.restype = ctypes.c_int
            _lib = lib
            break
        else:
            log.info("CUDA runtime library not found in this process; torch copies only")
        return _lib


def copy_async(lib: ctypes.CDLL, copies: Sequence[tuple[int, int]], nbytes: int,
               stream: torch.cuda.Stream) -> None:
    """Queue copies of `nbytes` each, (destination, source) address pairs, on `stream`: host to
    device in the main use. Asynchronous when the host side is page-locked; the caller keeps the
    source alive and unchanged until the stream has passed the copies. A run of consecutive
    destinations whose sources lie at one fixed stride (pages back to back in a store segment,
    each behind its header; consecutive slots of a host-tier arena) goes as one
    cudaMemcpy2DAsync; where CUDA refuses that (the span crosses allocations), halves of it."""
    handle = stream.cuda_stream
    i = 0
    while i < len(copies):
        dst, src = copies[i]
        end = i + 1
        pitch = copies[end][1] - src if end < len(copies) else 0
        if pitch >= nbytes:
            while (end < len(copies) and copies[end][0] == dst + (end - i) * nbytes
                   and copies[end][1] == src + (end - i) * pitch):
                end += 1
        _copy_run(lib, dst, src, end - i, nbytes, nbytes, pitch, handle)
        i = end


def address_runs(addresses: Sequence[int], nbytes: int) -> list[tuple[int, int, int]]:
    """(first index, count, pitch) of the maximal runs of `addresses` at one stride of at least
    nbytes (objects of nbytes back to back, or behind headers of one size), in order."""
    runs = []
    i, n = 0, len(addresses)
    while i < n:
        end = i + 1
        pitch = addresses[end] - addresses[i] if end < n else 0
        if pitch >= nbytes:
            while end < n and addresses[end] == addresses[i] + (end - i) * pitch:
                end += 1
        runs.append((i, end - i, pitch if end - i > 1 else nbytes))
        i = end
    return runs


def copy_rows_async(lib: ctypes.CDLL, dst: int, sources: Sequence[int], nbytes: int,
                    spans: Sequence[tuple[int, int]], stream: torch.cuda.Stream,
                    runs: Sequence[tuple[int, int, int]] | None = None,
                    after_span: Callable[[int], None] | None = None) -> None:
    """Rows of nbytes back to back at `dst` from `sources`, one span (offset, width) of every
    row after another: spans[0] of each row, then spans[1], ... (e.g. runs of layers of every
    page), each run of sources at one stride (`address_runs`, given or found) as one 2-D copy
    per span. `after_span(k)` is called once span k is queued (e.g. to record an event on
    `stream`). As `copy_async`: asynchronous from page-locked memory, refused copies halved."""
    handle = stream.cuda_stream
    runs = address_runs(sources, nbytes) if runs is None else runs
    for k, (offset, width) in enumerate(spans):
        for first, count, pitch in runs:
            _copy_run(lib, dst + first * nbytes + offset, sources[first] + offset, count, width,
                      nbytes, pitch, handle)
        if after_span is not None:
            after_span(k)


def _copy_run(lib: ctypes.CDLL, dst: int, src: int, count: int, width: int, dst_pitch: int,
              pitch: int, handle: int) -> None:
    """`count` copies of `width` bytes, destinations `dst_pitch` and sources `pitch` apart, as
    one 2-D copy. CUDA refuses one whose sources cross allocations (two arenas that happen to
    lie back to back): then each half is tried the same way, down to single pages."""
    if count == 1:
        _check(lib, lib.cudaMemcpyAsync(dst, src, width, _COPY_DEFAULT, handle),
               "cudaMemcpyAsync")
        return
    if not lib.cudaMemcpy2DAsync(dst, dst_pitch, src, pitch, width, count, _COPY_DEFAULT,
                                 handle):
        return
    lib.cudaGetLastError()  # refused (nothing queued): clear it, split the run
    half = count // 2
    _copy_run(lib, dst, src, half, width, dst_pitch, pitch, handle)
    _copy_run(lib, dst + half * dst_pitch, src + half * pitch, count - half, width, dst_pitch,
              pitch, handle)


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status:
        lib.cudaGetLastError()  # clear it: torch checks the same runtime's last error
        raise RuntimeError(f"{what} failed with CUDA error {status}")


class PinnedRanges:
    """Host address ranges page-locked with cudaHostRegister. `register` returns at once and pins
    on a background thread (hundreds of MB take a noticeable time); `covers` is true only once
    that finished. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict[int, int] = {}  # start -> end, registered
        self._pending: dict[int, threading.Thread] = {}

    def register(self, address: int, nbytes: int) -> None:
        lib = cudart()
        if lib is None:
            return
        thread = threading.Thread(target=self._pin, args=(lib, address, nbytes),
                                  name="kvmesh-host-register", daemon=True)
        with self._lock:
            self._pending[address] = thread
        thread.start()

    def unregister(self, address: int, nbytes: int) -> None:
        """Unpin a range (waits for its registration). The caller has no copy from it in flight."""
        with self._lock:
            thread = self._pending.pop(address, None)
        if thread is not None:
            thread.join()
        with self._lock:
            was_pinned = self._ranges.pop(address, None) is not None
        lib = cudart()
        if was_pinned and lib is not None:
            status = lib.cudaHostUnregister(address)
            if status:
                lib.cudaGetLastError()  # clear it: torch checks the same runtime's last error
                log.warning("cudaHostUnregister failed with CUDA error %d", status)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait for the registrations under way (page-locking a new store segment takes the
        driver a while, and other CUDA calls of this process may wait behind it); True when
        none is left."""
        with self._lock:
            threads = list(self._pending.values())
        for thread in threads:
            thread.join(timeout)
        with self._lock:
            return not self._pending

    def covers(self, address: int, nbytes: int) -> bool:
        with self._lock:
            return any(start <= address and address + nbytes <= end
                       for start, end in self._ranges.items())

    def _pin(self, lib: ctypes.CDLL, address: int, nbytes: int) -> None:
        status = lib.cudaHostRegister(address, nbytes, _REGISTER_PORTABLE)
        with self._lock:
            if self._pending.pop(address, None) is None:  # unregistered meanwhile: undo
                if not status:
                    lib.cudaHostUnregister(address)
                return
            if status:
                lib.cudaGetLastError()
                log.warning("cudaHostRegister of %d bytes failed with CUDA error %d; copies from "
                            "it go through the staging buffers", nbytes, status)
                return
            self._ranges[address] = address + nbytes
