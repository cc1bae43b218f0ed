"""The bulk pool: one thread pool for bulk page work (checksums, copies) of every caller.

codec's checksums and ctypes.memmove release the GIL, so work of several MB spread over a few
threads runs at once (a host-tier or store hit of an 8K-token prefix is ~1 GB of pages for
Llama-3-8B); small work runs inline on the caller's thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

_BULK_THREADS = min(16, os.cpu_count() or 1)
_BULK_POOL = ThreadPoolExecutor(max_workers=_BULK_THREADS, thread_name_prefix="kvmesh-bulk")
_PARALLEL_MIN_BYTES = 8 << 20

T = TypeVar("T")


def map_chunked(fn: Callable[[range], list[T]], n: int, nbytes: int) -> list[T]:
    """fn over contiguous index ranges covering range(n), one per pool thread, concatenated in
    order (one inline call when the work, `nbytes` in all, is small). fn must release the GIL
    for its heavy part (checksum, memmove) to gain anything."""
    with ChunkedTasks(fn, n, nbytes, -(-nbytes // _BULK_THREADS)) as tasks:
        return [value for _, values in tasks for value in values]


class ChunkedTasks(Generic[T]):
    """fn over contiguous index ranges of about `chunk_nbytes` (of `nbytes` in all) covering
    range(n), all queued on the shared pool when this is made (one inline call when the work is
    small). Iterating yields (range, fn(range)) in order as each is done, so the caller can work
    meanwhile and use the first ranges while the pool runs the rest. `close()` (or leaving the
    `with` block) cancels the ranges not yet started and waits for the running ones: they may
    read memory the caller frees next."""

    def __init__(self, fn: Callable[[range], list[T]], n: int, nbytes: int,
                 chunk_nbytes: int) -> None:
        self._inline: list[tuple[range, list[T]]] = []
        self._ranges: list[range] = []
        self._futures: list[Future[list[T]]] = []
        if n <= 0:
            return
        if nbytes < _PARALLEL_MIN_BYTES:
            self._inline = [(range(n), fn(range(n)))]
            return
        step = max(1, n * chunk_nbytes // nbytes)
        self._ranges = [range(start, min(start + step, n)) for start in range(0, n, step)]
        self._futures = [_BULK_POOL.submit(fn, part) for part in self._ranges]

    def __iter__(self) -> Iterator[tuple[range, list[T]]]:
        yield from self._inline
        for part, future in zip(self._ranges, self._futures, strict=True):
            yield part, future.result()

    def close(self) -> None:
        for future in self._futures:
            future.cancel()
        wait(self._futures)

    def __enter__(self) -> ChunkedTasks[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
