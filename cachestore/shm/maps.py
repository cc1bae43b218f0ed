"""Another process's /dev/shm segment files, mapped on demand: a cache of mappings by name.

Used both ways round: the store server maps a client's segment to write pages into it
(cachestore/shm/server.py), and a client maps the server's page arenas to read pages in place
(cachestore/shm/client.py). Only names matching `kvmesh-<hex>` inside the directory qualify,
opened with O_NOFOLLOW, regular files at least as large as claimed. Mappings are cached (LRU) and
dropped once their file is unlinked (its owner let it go) or replaced, or on `close`; a mapping
still in use is unmapped when its last user releases it. Nothing here ever unlinks a file.

`map_files=False` keeps only the open files (`mm` None): for a writer that must not map a file
its owner can shrink under it (a store access past a file's end is SIGBUS), and writes with
pwrite instead, which fails with an error.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable

from kvmesh.cachestore.errors import SegmentUnusable
from kvmesh.cachestore.shm import segments

MapCallback = Callable[[int, int], None]  # (address, nbytes)
log = logging.getLogger(__name__)


class MappedFile:
    """One cached mapping. `num_users` > 0 while someone reads or writes it."""

    def __init__(self, fd: int, mm: mmap.mmap | None, st: os.stat_result) -> None:
        self.fd, self.mm, self.identity = fd, mm, (st.st_dev, st.st_ino)
        self.address = segments.mapping_address(mm) if mm is not None else 0
        self.nbytes = len(mm) if mm is not None else st.st_size
        self.num_users = 0
        self.is_dropped = False


class SegmentMaps:
    """Thread-safe. `on_map(address, nbytes)` runs once per new mapping (e.g. cudaHostRegister),
    `on_unmap` right before one is unmapped. `populate`: map every page up front (else pages
    fault in on first use, and mapping costs next to nothing)."""

    def __init__(self, shm_dir: str = segments.SHM_DIR, max_segments: int = 32,
                 on_map: MapCallback | None = None, on_unmap: MapCallback | None = None,
                 populate: bool = True, map_files: bool = True) -> None:
        self._dir = shm_dir
        shared = segments.MAP_FLAGS if populate else mmap.MAP_SHARED
        self._flags: int | None = shared if map_files else None
        self._max_segments = max_segments
        self._on_map, self._on_unmap = on_map, on_unmap
        self._lock = threading.Lock()
        self._mapped: OrderedDict[str, MappedFile] = OrderedDict()
        self._is_closed = False

    def acquire(self, name: str, nbytes: int) -> MappedFile:
        """The mapping of segment `name`, at least `nbytes` long, taken for use until
        `release`. Raises SegmentUnusable."""
        if not segments.is_segment_name(name):
            raise SegmentUnusable("segment name is not kvmesh-<hex>", name)
        if not 0 < nbytes <= segments.MAX_SEGMENT_NBYTES:
            raise SegmentUnusable("segment capacity out of range", str(nbytes))
        path = os.path.join(self._dir, name)
        with self._lock:
            if self._is_closed:
                raise SegmentUnusable("closed", name)
            self._drop_unlinked()
            mapped = self._mapped.get(name)
            if mapped is not None and not _still_valid(mapped, path, nbytes):
                self._drop(self._mapped.pop(name))
                mapped = None
            if mapped is None:
                mapped = _open(path, nbytes, self._flags)
                self._mapped[name] = mapped
                while len(self._mapped) > self._max_segments:
                    self._drop(self._mapped.popitem(last=False)[1])
                self._call(self._on_map, mapped)
            self._mapped.move_to_end(name)
            mapped.num_users += 1
            return mapped

    def release(self, mapped: MappedFile) -> None:
        with self._lock:
            mapped.num_users -= 1
            if mapped.is_dropped and mapped.num_users == 0:
                self._close(mapped)

    def close(self) -> None:
        """Unmap every cached segment (those in use when their last user releases them)."""
        with self._lock:
            self._is_closed = True
            while self._mapped:
                self._drop(self._mapped.popitem()[1])

    def prepare(self, arenas: dict[str, int]) -> None:
        """Map these segments ({name: nbytes}) now if they are not yet (running on_map), so that
        a later acquire finds them ready; one that cannot be mapped is skipped."""
        for name, nbytes in arenas.items():
            with self._lock:
                if name in self._mapped:
                    continue
            try:
                self.release(self.acquire(name, nbytes))
            except SegmentUnusable:
                pass

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._mapped)

    # -- caller holds the lock ----------------------------------------------------------------

    @staticmethod
    def _call(callback: MapCallback | None, mapped: MappedFile) -> None:
        """A failing hook (e.g. page-locking) leaves the mapping usable, only slower."""
        if callback is not None:
            try:
                callback(mapped.address, mapped.nbytes)
            except Exception:
                log.warning("segment map hook failed", exc_info=True)

    def _drop_unlinked(self) -> None:
        """Forget segments whose file is gone: keeping them mapped would keep their memory."""
        for name, mapped in list(self._mapped.items()):
            if os.fstat(mapped.fd).st_nlink == 0:
                self._drop(self._mapped.pop(name))

    def _drop(self, mapped: MappedFile) -> None:
        mapped.is_dropped = True
        if mapped.num_users == 0:
            self._close(mapped)

    def _close(self, mapped: MappedFile) -> None:
        self._call(self._on_unmap, mapped)
        try:
            if mapped.mm is not None:
                mapped.mm.close()
        except BufferError:  # a view of it is still alive: unmapped when that goes
            pass
        os.close(mapped.fd)


def _open(path: str, nbytes: int, flags: int | None) -> MappedFile:
    """The file at `path`, mapped with `flags` (None: not mapped)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SegmentUnusable("cannot open segment", f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < nbytes:
            raise SegmentUnusable("segment is not a regular file of its capacity", path)
        mm = mmap.mmap(fd, st.st_size, flags=flags) if flags is not None else None
        return MappedFile(fd, mm, st)
    except (OSError, ValueError) as exc:
        os.close(fd)
        raise SegmentUnusable("cannot map segment", f"{path}: {exc}") from None
    except SegmentUnusable:
        os.close(fd)
        raise


def _still_valid(mapped: MappedFile, path: str, nbytes: int) -> bool:
    """The cached mapping is still the file at `path` and still holds `nbytes` bytes."""
    try:
        by_name = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    st = os.fstat(mapped.fd)
    return (by_name.st_dev, by_name.st_ino) == mapped.identity and min(
        st.st_size, mapped.nbytes
    ) >= nbytes
