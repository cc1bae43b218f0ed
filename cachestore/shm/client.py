"""Client side of shared-memory GetPages: a pool of reusable segments, and the mappings of the
server's page arenas for mapped reads; both hand out zero-copy views as PageLeases
(page_lease.py; segments and copies: segments.py; the server: server.py, leases.py).

Creating, reserving and first-touching a fresh segment costs about as much as the copy itself, so
segments are pooled: a get leases one (the smallest idle one that fits the expected size, else the
largest idle one, else a new one) and the lease's `release()` returns it. A server that finds the
segment too small answers with the size it needs, nothing written; the get then retries once with
a segment of at least that size (a quarter more, so a growing prefix does not regrow every call).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.maps import MappedFile, SegmentMaps, SegmentUnusable
from kvmesh.cachestore.shm.page_lease import PageLease, fits_mapped, fits_segment, pages_by_key
from kvmesh.cachestore.shm.segments import Segment

__all__ = ["PageLease", "SegmentPool", "fits_mapped", "fits_segment", "pages_by_key"]

log = logging.getLogger(__name__)
MIN_SEGMENT_NBYTES = 8 << 20
SEGMENT_ALIGN_NBYTES = 2 << 20
MAX_IDLE_SEGMENTS = 2
RESERVE_WAIT_S = 5.0  # a get waits this long at most for a segment being reserved
CALLS_INLINE_AFTER_DECLINE = 64  # after a server answered inline, ask again this much later

SegmentCallback = Callable[[int, int], None]  # (address, nbytes)
MAX_MAPPED_ARENAS = 256  # the store's arenas kept mapped (at most 256 MiB each)
EndLease = Callable[[int, Sequence[bytes]], None]  # (lease id, keys of bad pages)
Fetch = Callable[[Sequence[bytes], "Segment | None", bool], tuple[Any, list[memoryview]]]


class SegmentPool:
    """Segments this client created; thread-safe (one lock, never held across a call or a copy).
    Owns the files: `close()` unmaps and unlinks them, and so does a finalizer at exit. Also
    keeps the mappings of the server's page arenas that mapped gets read from (`arenas`; the
    server owns those files). `on_new_segment(address, nbytes)` runs once per new segment or
    arena mapping (e.g. to cudaHostRegister it), `on_release_segment(address, nbytes)` before
    one is unmapped."""

    def __init__(
        self,
        on_new_segment: SegmentCallback | None = None,
        on_release_segment: SegmentCallback | None = None,
        shm_dir: str = segments.SHM_DIR,
    ) -> None:
        self.on_new_segment, self.on_release_segment = on_new_segment, on_release_segment
        self._dir = shm_dir
        self._lock = threading.Lock()
        self._idle: list[Segment] = []
        self._segments: dict[str, Segment] = {}  # every live segment, idle or leased
        self._paths: set[str] = set()
        self._finalizer = weakref.finalize(self, segments.unlink_all, self._paths)
        self._is_closed = False
        self._page_nbytes_hint = 0  # largest page seen: len(keys) * this is a get's expected size
        self._reserved = threading.Event()  # clear while reserve() makes a segment
        self._reserved.set()
        self._calls_inline = 0
        # lazily mapped: page-locking (on_new_segment) or the first read faults them in
        self.arenas = SegmentMaps(shm_dir, MAX_MAPPED_ARENAS, on_new_segment, on_release_segment,
                                  populate=False)
        self._calls_unmapped = 0  # after arenas could not be mapped, ask again this much later

    @property
    def segment_names(self) -> list[str]:
        with self._lock:
            return sorted(self._segments)

    def read(self, fetch: Fetch, keys: Sequence[bytes],
             end_lease: EndLease | None = None) -> PageLease:
        """One GetPages of `keys` through a leased segment, with inline fallback. `fetch(keys,
        segment, accept_mapped)` does the call and returns (header, inline pages); a call that
        fails discards its segment (the server may still be writing into it) and raises. With
        `end_lease` (which ends a server lease by id), mapped pages are accepted too."""
        self._reserved.wait(timeout=RESERVE_WAIT_S)
        segment = self._lease(len(keys) * self._page_nbytes_hint, must_fit=False)
        with self._lock:
            accept_mapped = end_lease is not None and not self._calls_unmapped
            self._calls_unmapped = max(0, self._calls_unmapped - 1)
        sent_at = time.monotonic()
        for attempt in range(3):  # own segment; a large enough one; inline
            try:
                header, inline = fetch(keys, segment, accept_mapped)
            except BaseException:
                if segment is not None:
                    self._discard(segment)
                raise
            if not header.segment_nbytes_needed:
                break
            assert segment is not None  # fetch checks this
            self.give_back(segment)  # too small (the pages grew since the first try: inline)
            segment = self._lease(header.segment_nbytes_needed, True) if not attempt else None
        self._page_nbytes_hint = max(self._page_nbytes_hint, *header.page_nbytes, 0)
        if header.HasField("mapped"):
            assert end_lease is not None  # fetch checks this
            if segment is not None:
                self.give_back(segment)
            try:
                return self._mapped_lease(header, sent_at, end_lease)
            except SegmentUnusable as exc:  # e.g. another user's server: copies from now on
                log.info("cannot map the store's page arenas (%s): segments instead", exc)
                with self._lock:
                    self._calls_unmapped = CALLS_INLINE_AFTER_DECLINE
                return self.read(fetch, keys, end_lease)
        if not header.is_shared_memory:
            if segment is not None:
                self.give_back(segment)
                self._calls_inline = CALLS_INLINE_AFTER_DECLINE
            return PageLease(pages_by_key(header.is_found, inline))
        assert segment is not None
        base = memoryview(segment.mm).toreadonly()
        views = [
            base[offset : offset + nbytes]
            for offset, nbytes in zip(header.page_offsets, header.page_nbytes, strict=True)
        ]
        addresses = [segment.address + offset for offset in header.page_offsets]
        return PageLease(pages_by_key(header.is_found, views), segment, [*views, base], self,
                         addresses=pages_by_key(header.is_found, addresses))

    def _mapped_lease(self, header: Any, sent_at: float, end_lease: EndLease) -> PageLease:
        """Views of the found pages in the server's arenas, valid until `sent_at` plus the
        lease's time. Raises SegmentUnusable (the lease ended)."""
        mapped = header.mapped
        files: list[MappedFile] = []
        try:
            for name, nbytes in zip(mapped.arena_names, mapped.arena_nbytes, strict=True):
                files.append(self.arenas.acquire(name, nbytes))
        except BaseException:
            for file in files:
                self.arenas.release(file)
            end_lease(mapped.lease_id, ())
            raise
        bases = []
        for file in files:
            assert file.mm is not None  # `arenas` maps its files (map_files)
            bases.append(memoryview(file.mm).toreadonly())
        views = [
            bases[arena][offset : offset + nbytes]
            for arena, offset, nbytes in zip(mapped.page_arenas, header.page_offsets,
                                             header.page_nbytes, strict=True)
        ]

        def on_release(bad_keys: Sequence[bytes]) -> None:
            for file in files:
                self.arenas.release(file)
            end_lease(mapped.lease_id, bad_keys)

        addresses = [files[arena].address + offset
                     for arena, offset in zip(mapped.page_arenas, header.page_offsets,
                                              strict=True)]
        return PageLease(pages_by_key(header.is_found, views), views=[*views, *bases],
                         addresses=pages_by_key(header.is_found, addresses),
                         regions=[(file.address, file.nbytes) for file in files],
                         valid_until=sent_at + mapped.lease_ms / 1000, on_release=on_release)

    def give_back(self, segment: Segment) -> None:
        with self._lock:
            if self._is_closed or segment.name not in self._segments:
                return
            self._idle.append(segment)
            if len(self._idle) <= MAX_IDLE_SEGMENTS:
                return
            victim = min(self._idle, key=lambda s: s.capacity)
            self._idle.remove(victim)
            del self._segments[victim.name]
        self._close_segment(victim)

    def close(self) -> None:
        with self._lock:
            self._is_closed = True
            segments = list(self._segments.values())
            self._segments.clear()
            self._idle.clear()
        for segment in segments:
            self._close_segment(segment)
        self._finalizer()
        self.arenas.close()

    def reserve(self, nbytes: int) -> None:
        """Make an idle segment of at least `nbytes` now (and run on_new_segment on it), so that
        the first get of that size does not pay for creating (and page-locking) it; nothing
        when an idle one already fits. A get meanwhile waits for it (a few seconds at most)
        rather than make a segment of its own. A failure is logged and changes nothing else."""
        with self._lock:
            if self._is_closed or any(s.capacity >= nbytes for s in self._idle):
                return
            self._reserved.clear()
        try:
            segment = self._create(-(-nbytes // SEGMENT_ALIGN_NBYTES) * SEGMENT_ALIGN_NBYTES)
            if segment is not None:
                self.give_back(segment)
        except OSError as exc:
            log.info("no shared-memory segment of %d bytes reserved (%s)", nbytes, exc)
        finally:
            self._reserved.set()

    def _lease(self, nbytes: int, must_fit: bool) -> Segment | None:
        """An idle segment (smallest that fits; else, unless must_fit, the largest) or a new one
        of about `nbytes`; None (inline) when segments cannot be made or the server declined."""
        with self._lock:
            if self._is_closed:
                return None
            if self._calls_inline:
                self._calls_inline -= 1
                return None
            fits = [s for s in self._idle if s.capacity >= nbytes]
            if fits or (self._idle and not must_fit):
                chosen = (
                    min(fits, key=lambda s: s.capacity)
                    if fits
                    else max(self._idle, key=lambda s: s.capacity)
                )
                self._idle.remove(chosen)
                return chosen
        nbytes = max(MIN_SEGMENT_NBYTES, nbytes + nbytes // 4 if must_fit else nbytes)
        nbytes = -(-nbytes // SEGMENT_ALIGN_NBYTES) * SEGMENT_ALIGN_NBYTES
        try:
            return self._create(nbytes)
        except OSError as exc:
            log.info("no shared-memory segment of %d bytes (%s): inline data", nbytes, exc)
            self._calls_inline = CALLS_INLINE_AFTER_DECLINE
            return None

    def _create(self, nbytes: int) -> Segment | None:
        """A new segment, registered and passed to on_new_segment; None if the pool closed
        meanwhile (the segment is then removed at once). Raises OSError."""
        segment = segments.create_segment(nbytes, self._dir)
        with self._lock:
            is_closed = self._is_closed
            if not is_closed:
                self._segments[segment.name] = segment
                self._paths.add(segment.path)
        if is_closed:  # close() ran while the file was made: it must not outlive the pool
            segment.close()  # (unlinks it)
            return None
        if self.on_new_segment is not None:
            try:
                self.on_new_segment(segment.address, segment.capacity)
            except Exception:  # an unpinned segment still works, only slower to copy from
                log.warning("on_new_segment failed for %s", segment.name, exc_info=True)
        return segment

    def _discard(self, segment: Segment) -> None:
        with self._lock:
            self._segments.pop(segment.name, None)
        self._close_segment(segment)

    def _close_segment(self, segment: Segment) -> None:
        if self.on_release_segment is not None:
            try:
                self.on_release_segment(segment.address, segment.capacity)
            except Exception:
                log.warning("on_release_segment failed for %s", segment.name, exc_info=True)
        segment.close()
        self._paths.discard(segment.path)
