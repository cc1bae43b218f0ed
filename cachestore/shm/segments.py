"""Same-host shared memory for GetPages: segment files in /dev/shm and fast parallel copies.

A *segment* is a file `/dev/shm/kvmesh-<hex>` that a client creates (O_EXCL, mode 0600), sizes
with posix_fallocate (so a full /dev/shm fails at creation, not as SIGBUS on a later write) and
keeps mapped; the server maps the same file and writes pages into it (cachestore/shm/server.py),
so a get moves its bytes with memcpy instead of through a gRPC stream. Client side:
cachestore/shm/client.py. gRPC stays the control plane: the request names the segment, the reply
header says where each page landed.

Whoever creates a segment file holds a shared flock on it for as long as it keeps the file, and
the lock dies with the process however it dies. So a file nobody holds a lock on was left by a
process that is gone (killed, say, by SIGKILL): the first segment a process creates first sweeps
such files out of the directory (`sweep_stale`; only its own user's files, and only ones at least
STALE_AFTER_S old, so a file just being created is never taken).

Copies go through `copy_many`: chunks of a few MiB spread over the shared bulk thread pool
(cachestore.bulk_pool.map_chunked); ctypes' `memmove` is a plain foreign call, which releases the
GIL, so the chunks really run in parallel.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence

import numpy as np

from kvmesh.cachestore.bulk_pool import map_chunked

SHM_DIR = "/dev/shm"
NAME_PREFIX = "kvmesh-"
SEGMENT_NAME = re.compile(r"kvmesh-[0-9a-f]{1,64}")  # fullmatch: no slash, no dots
MAX_SEGMENT_NBYTES = 1 << 40
COPY_CHUNK_NBYTES = 4 << 20
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # map every page up front
STALE_AFTER_S = 10.0

log = logging.getLogger(__name__)
_swept: set[str] = set()  # directories this process has swept
_sweep_lock = threading.Lock()

Move = tuple[int, int, int]  # (destination address, source address, nbytes)


def is_segment_name(name: str) -> bool:
    return SEGMENT_NAME.fullmatch(name) is not None


def is_local_target(target: str) -> bool:
    """True for gRPC targets on this host: unix sockets, 127.0.0.0/8, localhost, ::1."""
    if target.startswith("unix:"):
        return True
    host = target.removeprefix("dns:").lstrip("/").removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in ("localhost", "::1") or host.startswith("127.")


def is_local_peer(peer: str) -> bool:
    """True for a grpc `context.peer()` on this host: 'unix:...', 'ipv4:127.x.y.z:port',
    'ipv6:[::1]:port' (or an IPv4-mapped loopback address)."""
    if peer.startswith("unix:"):
        return True
    if peer.startswith("ipv4:"):
        return peer[5:].startswith("127.")
    if peer.startswith("ipv6:"):
        host = peer[5:].removeprefix("%5B").removeprefix("[").split("]", 1)[0].split("%5D")[0]
        return host == "::1" or host.startswith("::ffff:127.")
    return False


def mapping_address(mm: mmap.mmap) -> int:
    """Address of a writable mapping's first byte. The temporary ctypes export is dropped at once,
    so the mapping can still be closed."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


class Segment:
    """One segment this process created: the file's name, its mapping, and the locked fd that
    marks the file as in use."""

    def __init__(self, name: str, path: str, mm: mmap.mmap, fd: int) -> None:
        self.name = name
        self.path = path
        self.mm = mm
        self.capacity = len(mm)
        self.address = mapping_address(mm)
        self._fd: int | None = fd

    def remove_file(self) -> None:
        """Unlink the file and drop its lock; the mapping stays valid until unmapped."""
        unlink_quietly(self.path)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Unmap (when no view of it is alive any more; else when the last one dies) and unlink."""
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view: the mapping lives until it goes
            pass
        self.remove_file()


def create_segment(capacity: int, shm_dir: str = SHM_DIR) -> Segment:
    """Create, reserve and map a fresh segment of `capacity` bytes. Raises OSError (no /dev/shm,
    ENOSPC, ...) with nothing left behind."""
    sweep_once(shm_dir)
    name = NAME_PREFIX + secrets.token_hex(8)
    path = os.path.join(shm_dir, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # in use for as long as this fd is open
        os.posix_fallocate(fd, 0, capacity)
        mm = mmap.mmap(fd, capacity, flags=MAP_FLAGS)
    except BaseException:
        unlink_quietly(path)
        os.close(fd)
        raise
    return Segment(name, path, mm, fd)


def sweep_once(shm_dir: str = SHM_DIR) -> None:
    """sweep_stale(shm_dir), the first time this process asks for that directory."""
    with _sweep_lock:
        if shm_dir in _swept:
            return
        _swept.add(shm_dir)
    try:
        removed = sweep_stale(shm_dir)
    except OSError as exc:
        log.debug("could not sweep %s: %s", shm_dir, exc)
        return
    if removed:
        log.info("removed %d shared-memory segments left by processes that are gone", removed)


def sweep_stale(shm_dir: str = SHM_DIR, older_than_s: float = STALE_AFTER_S) -> int:
    """Unlink segment files of this user that no process holds (no lock on them) and that are
    at least `older_than_s` old. Returns how many went."""
    removed = 0
    now = time.time()
    for name in os.listdir(shm_dir):
        if not is_segment_name(name):
            continue
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if (st.st_uid != os.getuid() or now - st.st_mtime < older_than_s
                    or not os.path.samestat(st, os.stat(path, follow_symlinks=False))):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live process (BlockingIOError), or gone meanwhile
            continue
        finally:
            os.close(fd)  # (drops our lock too)
        unlink_quietly(path)
        removed += 1
    return removed


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unlink_all(paths: set[str]) -> None:
    """Finalizer of a client's segment pool: remove files left behind (exit without close())."""
    for path in list(paths):
        unlink_quietly(path)
    paths.clear()


def buffer_address(buf: bytes | memoryview) -> tuple[int, np.ndarray]:
    """(address of buf's first byte, an array that keeps the buffer exported while in use)."""
    array = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
    return array.ctypes.data, array


def copy_many(moves: Sequence[Move]) -> None:
    """memmove each (dst, src, nbytes), cut into COPY_CHUNK_NBYTES chunks that large totals run
    on the shared bulk thread pool with the GIL released. The caller keeps both sides alive and
    mapped."""
    pieces = [
        (dst + start, src + start, min(COPY_CHUNK_NBYTES, n - start))
        for dst, src, n in moves
        for start in range(0, n, COPY_CHUNK_NBYTES)
    ]

    def run(indices: range) -> list[None]:
        for i in indices:
            ctypes.memmove(*pieces[i])
        return []

    map_chunked(run, len(pieces), sum(n for _, _, n in moves))


def copy_out(pages: Sequence[memoryview | None]) -> list[memoryview | None]:
    """The pages copied into one new private buffer (read-only views into it, None kept): what a
    caller may hold after the segment they came from is reused."""
    found = [p for p in pages if p is not None]
    out = np.empty(sum(p.nbytes for p in found), dtype=np.uint8)
    view = out.data.toreadonly()
    moves, keep, offset = [], [], 0
    for page in found:
        address, array = buffer_address(page)
        keep.append(array)
        moves.append((out.ctypes.data + offset, address, page.nbytes))
        offset += page.nbytes
    copy_many(moves)
    copies = iter(view[dst - out.ctypes.data : dst - out.ctypes.data + n] for dst, _, n in moves)
    return [None if p is None else next(copies) for p in pages]

