"""Server side of shared-memory GetPages: map a same-host client's segment and write pages into it.

Only peers on loopback or a unix socket qualify, and only names matching `kvmesh-<hex>` inside
/dev/shm, opened with O_NOFOLLOW, regular files, at least as large as the capacity the client
claims. Anything else reads as "cannot", and the caller answers with inline data frames: bad input
never fails the call. Mappings are cached per name (LRU) and dropped when their file is unlinked
(the client closed or replaced it) or the server stops; the server never unlinks a segment.

A same-user process that truncates its segment while the server writes could still raise SIGBUS
here; the size is re-checked right before every write, which leaves only that deliberate race.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from cachestore import shm
from cachestore.codec import map_chunked
from cachestore.page_access import is_intact
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)
MAX_MAPPED_SEGMENTS = 32


class _Mapped:
    """One cached mapping of a client segment. `num_users` > 0 while a copy writes into it."""

    def __init__(self, fd: int, mm: mmap.mmap, st: os.stat_result) -> None:
        self.fd, self.mm, self.identity = fd, mm, (st.st_dev, st.st_ino)
        self.address = shm.mapping_address(mm)
        self.num_users = 0
        self.is_dropped = False

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class SegmentWriter:
    """Thread-safe. Owns the cached mappings (closed by `close`); never owns the files."""

    def __init__(self, shm_dir: str = shm.SHM_DIR, max_segments: int = MAX_MAPPED_SEGMENTS) -> None:
        self._dir = shm_dir
        self._max_segments = max_segments
        self._lock = threading.Lock()
        self._mapped: OrderedDict[str, _Mapped] = OrderedDict()
        self._reasons_logged: set[str] = set()
        self._is_closed = False

    def write_pages(
        self,
        segment: store_pb2.SharedMemorySegment,
        blobs: Sequence[bytes | memoryview | None],
        peer: str,
        keys: Sequence[bytes] | None = None,
        on_bad: Callable[[list[bytes]], object] | None = None,
    ) -> store_pb2.GetPagesHeader | None:
        """Write the found pages back to back into `segment` from offset 0 and return the reply
        header; None when this segment cannot be used (the caller answers inline). With `keys`,
        the pages are unchecked: each is checked (codec header, key, checksum) on its copy in the
        segment, right after the copy while it is in cache, so the source is read once; a page
        that fails reads as not found and its key goes to `on_bad`."""
        if not shm.is_local_peer(peer):
            return self._decline("peer is not on this host", peer)
        found = [memoryview(b).cast("B") for b in blobs if b is not None]
        sizes = [page.nbytes for page in found]
        is_found = [b is not None for b in blobs]
        if sum(sizes) > segment.capacity:
            return store_pb2.GetPagesHeader(
                is_found=is_found, page_nbytes=sizes, segment_nbytes_needed=sum(sizes)
            )
        mapped = self._acquire(segment.name, segment.capacity) if found else None
        if found and mapped is None:
            return None
        offsets, offset = [], 0
        for size in sizes:
            offsets.append(offset)
            offset += size
        ok = [True] * len(found)
        if mapped is not None:
            try:
                keep = [shm.buffer_address(page) for page in found]
                moves = [
                    (mapped.address + offset, address, size)
                    for offset, (address, _), size in zip(offsets, keep, sizes, strict=True)
                ]
                if keys is None:
                    shm.copy_many(moves)
                else:
                    found_keys = [key for key, b in zip(keys, blobs, strict=True) if b is not None]
                    ok = _copy_and_check(mapped.mm, moves, offsets, found_keys)
            finally:
                self._release(mapped)
        if not all(ok):
            found_at = [i for i, flag in enumerate(is_found) if flag]
            bad = [found_at[j] for j, good in enumerate(ok) if not good]
            for i in bad:
                is_found[i] = False
            sizes = [size for size, good in zip(sizes, ok, strict=True) if good]
            offsets = [offset for offset, good in zip(offsets, ok, strict=True) if good]
            if on_bad is not None and keys is not None:
                on_bad([keys[i] for i in bad])
        return store_pb2.GetPagesHeader(
            is_found=is_found, page_nbytes=sizes, is_shared_memory=True, page_offsets=offsets
        )

    def close(self) -> None:
        """Unmap every cached segment (those being written to when their copy ends)."""
        with self._lock:
            self._is_closed = True
            while self._mapped:
                self._drop(self._mapped.popitem()[1])

    # -- mappings (caller holds no lock) ------------------------------------------------------

    def _acquire(self, name: str, capacity: int) -> _Mapped | None:
        if not shm.is_segment_name(name):
            return self._decline("segment name is not kvmesh-<hex>", name)
        if not 0 < capacity <= shm.MAX_SEGMENT_NBYTES:
            return self._decline("segment capacity out of range", str(capacity))
        path = os.path.join(self._dir, name)
        with self._lock:
            if self._is_closed:
                return None
            self._drop_unlinked()
            mapped = self._mapped.get(name)
            if mapped is not None and not _still_valid(mapped, path, capacity):
                self._drop(self._mapped.pop(name))
                mapped = None
            if mapped is None:
                mapped = self._open(path, capacity)
                if mapped is None:
                    return None
                self._mapped[name] = mapped
                while len(self._mapped) > self._max_segments:
                    self._drop(self._mapped.popitem(last=False)[1])
            self._mapped.move_to_end(name)
            mapped.num_users += 1
            return mapped

    def _release(self, mapped: _Mapped) -> None:
        with self._lock:
            mapped.num_users -= 1
            if mapped.is_dropped and mapped.num_users == 0:
                mapped.close()

    def _open(self, path: str, capacity: int) -> _Mapped | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            return self._decline("cannot open segment", f"{path}: {exc.strerror}")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < capacity:
                os.close(fd)
                return self._decline("segment is not a regular file of its capacity", path)
            return _Mapped(fd, mmap.mmap(fd, st.st_size, flags=shm.MAP_FLAGS), st)
        except (OSError, ValueError) as exc:
            os.close(fd)
            return self._decline("cannot map segment", f"{path}: {exc}")

    def _drop_unlinked(self) -> None:
        """Forget segments whose file is gone (client closed or replaced them): keeping them
        mapped would keep their memory allocated."""
        for name, mapped in list(self._mapped.items()):
            if os.fstat(mapped.fd).st_nlink == 0:
                self._drop(self._mapped.pop(name))

    def _drop(self, mapped: _Mapped) -> None:
        mapped.is_dropped = True
        if mapped.num_users == 0:
            mapped.close()

    def _decline(self, reason: str, detail: str) -> None:
        if reason not in self._reasons_logged:  # once per reason: a bad client must not flood
            self._reasons_logged.add(reason)
            log.info("GetPages answers inline: %s (%s)", reason, detail)
        return None


def _copy_and_check(mm: mmap.mmap, moves: Sequence[shm.Move], offsets: Sequence[int],
                    keys: Sequence[bytes]) -> list[bool]:
    """memmove each page into the segment, then check its copy there: on the bulk thread pool
    (memmove and the checksum release the GIL)."""
    segment = memoryview(mm)

    def run(indices: range) -> list[bool]:
        ok = []
        for j in indices:
            dst, src, size = moves[j]
            ctypes.memmove(dst, src, size)
            ok.append(is_intact(keys[j], segment[offsets[j] : offsets[j] + size]))
        return ok

    try:
        return map_chunked(run, len(moves), sum(size for _, _, size in moves))
    finally:
        try:
            segment.release()
        except BufferError:  # a view of it still alive somewhere: the mapping outlives it
            pass


def _still_valid(mapped: _Mapped, path: str, capacity: int) -> bool:
    """The cached mapping is still the file at `path` and still holds `capacity` bytes."""
    try:
        by_name = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    st = os.fstat(mapped.fd)
    return (by_name.st_dev, by_name.st_ino) == mapped.identity and min(
        st.st_size, len(mapped.mm)
    ) >= capacity
