"""Disk tier: one file per encoded page, LRU by bytes, survives restarts.

Layout: `<root>/<key hex[:2]>/<key hex>.page`. A page is written to a `.tmp` file in the same
directory and renamed over its final name (os.replace is atomic), so a reader sees a whole page
or none. No fsync: a crash may lose recent pages, never expose a partial one as valid (and
every get is verified by TieredStore anyway).

At start the index is rebuilt from the page headers (codec.decode_header on a read-only mmap,
so only the header is read): leftover `.tmp` files, unreadable or truncated pages and pages
whose header key differs from their file name are deleted. Only `*.page` / `*.tmp` files in
two-hex-digit subdirectories are considered; anything else under the root is left alone.
Recency order after a restart is file mtime; hits refresh mtime so the order survives the next
restart too.

Readers open the file outside the lock; eviction unlinks it, and on POSIX an already opened file
stays readable, so a page is never freed under a reader.

With `mac_key` (a disk shared with others, or not trusted) every file holds the page sealed
(cachestore.page_mac: a 32-byte nonce + Poly1305 trailer after the page), opened on every read,
including the read of an evicted page for demotion (a forged page must not move on to the next
tier under its MAC): a page whose MAC fails is a miss, is deleted and is counted in
`num_forged` and `errors`. The restart rebuild reads only headers and checks the file size
with the trailer; MACs are checked on read, so a restart with another key keeps the files
until each is read, then drops it as a miss. Without a key, files are bare pages.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from kvmesh.cachestore.codec import PageCorrupt, decode_header
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.keys import KEY_NBYTES
from kvmesh.cachestore.page_mac import TRAILER_NBYTES, PageMac
from kvmesh.cachestore.tiers.base import Page, Tier, TierFull, TierStats, TierUnavailable
from kvmesh.cachestore.tiers.lru import LruIndex

_SUFFIX = ".page"
_TMP_SUFFIX = ".tmp"


class DiskTier(Tier):
    """Thread-safe; `put_many` returns evicted pages (read back before unlinking) for demotion
    unless `read_evicted=False` (the last tier of a chain need not read what it drops)."""

    name = "disk"

    def __init__(self, path: str | os.PathLike, capacity_bytes: int,
                 read_evicted: bool = True, mac_key: bytes | None = None) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise InvalidConfig(f"disk tier capacity_bytes must be a positive int, "
                                f"got {capacity_bytes!r}")
        self.root = Path(path)
        self._root_str = str(self.root)
        self.read_evicted = read_evicted
        self._lock = threading.Lock()
        self._lru = LruIndex(capacity_bytes)
        self._stats = TierStats(name=self.name, capacity_bytes=capacity_bytes)
        self.num_dropped_at_start = 0
        self._mac = PageMac(mac_key) if mac_key is not None else None
        self._trailer_nbytes = TRAILER_NBYTES if self._mac is not None else 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidConfig(f"disk tier cannot create {self.root}: {e}") from e
        self._rebuild_index()

    # -- Tier API ------------------------------------------------------------------------------

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._lru for key in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        out: list[bytes | memoryview | None] = []
        for key in keys:
            with self._lock:
                is_present = self._lru.touch(key)
            blob = self._read(key) if is_present else None
            page = self._open(key, blob) if blob is not None else None
            with self._lock:
                if page is None:
                    self._stats.misses += 1
                    if is_present:  # file vanished under us (evicted, or removed by hand)
                        self._lru.remove(key)
                else:
                    self._stats.hits += 1
            out.append(page)
        return out

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        evicted: list[Page] = []
        for key, blob in pages:
            nbytes = memoryview(blob).nbytes + self._trailer_nbytes
            with self._lock:
                if self._lru.touch(key):
                    continue
                if not self._lru.fits(nbytes):
                    evicted.append((key, blob))
                    continue
            self._write(key, blob)  # outside the lock: visible only after the rename
            with self._lock:
                if self._lru.touch(key):  # another thread stored the same page meanwhile
                    continue
                victims = self._lru.victims_for(nbytes)
                for victim in victims:
                    self._lru.remove(victim)
                    self._stats.evictions += 1
                self._lru.add(key, nbytes)
            for victim in victims:
                old = self._read_evicted(victim) if self.read_evicted else None
                self._unlink(victim)
                if old is not None:
                    evicted.append((victim, old))
        return evicted

    def delete_many(self, keys: Sequence[bytes]) -> int:
        num_deleted = 0
        for key in keys:
            with self._lock:
                is_present = self._lru.remove(key) is not None
            if is_present:
                self._unlink(key)
                num_deleted += 1
        return num_deleted

    def keys_lru_order(self) -> list[bytes]:
        """Keys from least to most recently used (for tests and debugging)."""
        with self._lock:
            return self._lru.keys_oldest_first()

    def stats(self) -> TierStats:
        with self._lock:
            s = self._stats
            return TierStats(self.name, self._lru.used_bytes, s.capacity_bytes, len(self._lru),
                             s.hits, s.misses, s.evictions, s.errors, True, s.num_forged)

    # -- files ---------------------------------------------------------------------------------

    def path_of(self, key: bytes) -> Path:
        return Path(self._file_of(key))

    def _file_of(self, key: bytes) -> str:
        hex_key = key.hex()  # plain strings: pathlib cost more than the read of a small page
        return f"{self._root_str}/{hex_key[:2]}/{hex_key}{_SUFFIX}"

    def _read(self, key: bytes) -> bytes | None:
        try:
            with open(self._file_of(key), "rb") as f:
                blob = f.read()
                os.utime(f.fileno())  # persist recency for the next restart's ordering
        except FileNotFoundError:
            return None
        except OSError as e:  # counted by the caller, like every TierUnavailable
            raise TierUnavailable(f"disk tier read failed: {e}") from e
        return blob

    def _read_evicted(self, key: bytes) -> bytes | memoryview | None:
        """An evicted page for demotion; unreadable means it is simply not demoted."""
        try:
            with open(self._file_of(key), "rb") as f:
                blob = f.read()
        except OSError:
            return None
        return self._open(key, blob, is_evicted=True)

    def _write(self, key: bytes, blob: bytes | memoryview) -> None:
        path = self._file_of(key)
        tmp = f"{path}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            try:
                f = open(tmp, "wb")
            except FileNotFoundError:  # first page of this subdirectory
                try:
                    os.mkdir(os.path.dirname(path))  # (not the root: a root gone stays gone)
                except FileExistsError:  # another writer made it just now
                    pass
                f = open(tmp, "wb")
            with f:
                f.write(blob)
                if self._mac is not None:
                    f.write(self._mac.trailer(blob))
            os.replace(tmp, path)
        except OSError as e:
            _remove(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFull(f"disk tier file system is full: {e}") from e
            raise TierUnavailable(f"disk tier write failed: {e}") from e

    def _open(self, key: bytes, blob: bytes, is_evicted: bool = False) -> bytes | memoryview | None:
        """The page in a file's bytes; None (the file deleted, counted) if its MAC fails."""
        if self._mac is None:
            return blob
        page = self._mac.open(blob)
        if page is None:
            with self._lock:
                self._stats.num_forged += 1
                self._stats.errors += 1
                is_ours = not is_evicted and self._lru.remove(key) is not None
            if is_ours:  # an evicted page's file is unlinked by its evictor
                self._unlink(key)
        return page

    def _unlink(self, key: bytes) -> None:
        try:
            _remove(self._file_of(key))
        except OSError:
            self._count_error()

    def _count_error(self) -> None:
        with self._lock:
            self._stats.errors += 1

    def _rebuild_index(self) -> None:
        found: list[tuple[float, bytes, int]] = []  # (mtime, key, nbytes)
        for sub in sorted(self.root.iterdir()):
            if not (sub.is_dir() and len(sub.name) == 2 and _is_hex(sub.name)):
                continue  # not ours: never delete what this tier did not write
            for path in sub.iterdir():
                if not path.name.endswith((_SUFFIX, _TMP_SUFFIX)):
                    continue
                key = _valid_page_key(path, self._trailer_nbytes)
                if key is None:
                    path.unlink(missing_ok=True)
                    self.num_dropped_at_start += 1
                    continue
                st = path.stat()
                found.append((st.st_mtime, key, st.st_size))
        found.sort()
        for _, key, nbytes in found:
            for victim in self._lru.victims_for(nbytes):  # capacity shrank since last run
                self._lru.remove(victim)
                self._unlink(victim)
            self._lru.add(key, nbytes)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _is_hex(name: str) -> bool:
    return all(c in "0123456789abcdef" for c in name)


def _valid_page_key(path: Path, trailer_nbytes: int) -> bytes | None:
    """The key of a whole, well-formed page file (page, then `trailer_nbytes` of MAC) named after
    its header key; else None. The MAC itself is checked when the page is read."""
    if not path.name.endswith(_SUFFIX):
        return None  # leftover .tmp of an interrupted write, or a stranger
    try:
        key = bytes.fromhex(path.name[: -len(_SUFFIX)])
        if len(key) != KEY_NBYTES or not path.is_file() or path.stat().st_size <= trailer_nbytes:
            return None
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)  # only the header's pages are read from disk
            try:
                # the header (and its views) dies here
                header_key = decode_header(view[: view.nbytes - trailer_nbytes]).key
            finally:
                view.release()
    except (ValueError, OSError, PageCorrupt, BufferError):
        return None
    return key if header_key == key else None
