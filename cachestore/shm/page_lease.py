"""What a key-level get hands back (PageLease) and the checks on a GetPages reply header that
say where its pages lie (in the client's segment, or in the server's arenas)."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from kvmesh.cachestore.shm.segments import Segment

T = TypeVar("T")


class SegmentOwner(Protocol):
    """Where a released lease's segment goes back to (shm.client.SegmentPool)."""

    def give_back(self, segment: Segment) -> None: ...


class PageLease:
    """Pages of one `StoreClient.get_pages_leased` call.

    `pages`: one read-only memoryview per key, None where missing; views into shared memory
    (`is_shared_memory`: this client's segment, or the server's own page arenas when the get
    accepted mapped pages), into received frames, or into one of the client's registered
    buffers (the NIXL data plane; not shared memory). `regions`: (address, nbytes) of the
    memory the pages lie in, when it is not frames; `addresses`: each page's address there
    (None for frames).
    `release()` gives the memory back (the segment to the client's pool; mapped pages to the
    server) and invalidates the views it can (further use raises ValueError); using any page
    after release is a bug. Idempotent; also a context manager.

    Mapped pages stay unchanged only until `valid_until` (time.monotonic()): whoever reads them
    checks every page it read and then `is_valid()`; false means the server may have reused
    their memory meanwhile, so what was read counts as a miss."""

    def __init__(
        self,
        pages: list[memoryview | None],
        segment: Segment | None = None,
        views: Sequence[memoryview] = (),
        pool: SegmentOwner | None = None,
        regions: Sequence[tuple[int, int]] = (),
        valid_until: float | None = None,
        on_release: Callable[[Sequence[bytes]], None] | None = None,
        addresses: list[int | None] | None = None,
        is_shared_memory: bool | None = None,
    ) -> None:
        """`is_shared_memory` None: whether a segment or mapped pages (`on_release`) it is."""
        self.pages = pages
        self.addresses = addresses  # per key, the page's address in shared memory (or None)
        if is_shared_memory is None:
            is_shared_memory = segment is not None or on_release is not None
        self.is_shared_memory = is_shared_memory
        self.regions = list(regions)
        if segment is not None:
            self.regions.append((segment.address, segment.capacity))
        self.valid_until = valid_until
        self._segment, self._views, self._pool = segment, list(views), pool
        self._on_release = on_release
        self._bad_keys: list[bytes] = []
        self._lock = threading.Lock()

    def is_valid(self) -> bool:
        return self.valid_until is None or time.monotonic() < self.valid_until

    def report_bad(self, keys: Sequence[bytes]) -> None:
        """Pages of a mapped lease that failed the caller's check while the lease held: sent
        with the release, so the server checks and drops them (other leases: the server
        checked them already)."""
        with self._lock:
            self._bad_keys.extend(keys)

    def release(self) -> None:
        with self._lock:
            segment, self._segment = self._segment, None
            views, self._views = self._views, []
            on_release, self._on_release = self._on_release, None
            bad_keys = self._bad_keys
        for view in views:
            try:
                view.release()
            except BufferError:  # the caller made an export of it (e.g. numpy): leave it
                pass
        if segment is not None:
            assert self._pool is not None
            self._pool.give_back(segment)
        if on_release is not None:
            on_release(bad_keys)

    def __enter__(self) -> PageLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_segment", None) is not None or getattr(self, "_on_release", None):
            warnings.warn("PageLease dropped without release()", ResourceWarning, stacklevel=2)


def pages_by_key(is_found: Sequence[bool], found: Sequence[T]) -> list[T | None]:
    """One entry per key: the next found page (or whatever stands for it), or None."""
    pages = iter(found)
    return [next(pages) if flag else None for flag in is_found]


def fits_mapped(header: Any) -> bool:
    """A mapped reply names an arena and an offset inside it for every found page, and a lease."""
    mapped = header.mapped
    num_arenas = len(mapped.arena_names)
    return (
        mapped.lease_id != 0
        and len(mapped.arena_nbytes) == num_arenas
        and len(mapped.page_arenas) == len(header.page_offsets) == len(header.page_nbytes)
        and all(
            arena < num_arenas and offset + nbytes <= mapped.arena_nbytes[arena]
            for arena, offset, nbytes in zip(mapped.page_arenas, header.page_offsets,
                                             header.page_nbytes, strict=True)
        )
    )


def fits_segment(header: Any, capacity: int) -> bool:
    """Every page of a shared-memory reply lies inside the segment."""
    if header.segment_nbytes_needed:
        return not header.is_shared_memory
    return len(header.page_offsets) == len(header.page_nbytes) and all(
        offset + nbytes <= capacity
        for offset, nbytes in zip(header.page_offsets, header.page_nbytes, strict=True)
    )
