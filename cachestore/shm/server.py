"""Server side of shared-memory GetPages: map a same-host client's segment and write pages into it.

Only peers on loopback or a unix socket qualify, and only segments cachestore/shm/maps.py will
map (`kvmesh-<hex>` in /dev/shm, regular files of the claimed capacity). Anything else reads as
"cannot", and the caller answers with inline data frames: bad input never fails the call.
Open files are cached per name and dropped when their file is unlinked (the client closed or
replaced it) or the server stops; the server never unlinks a segment.

The server never maps a client's segment: the client may shrink (ftruncate) or punch its file at
any moment, and a store into a mapping past the file's end is SIGBUS, which kills the whole
store. Pages go in with pwrite, which the kernel turns into an error (or a regrown file) instead,
so a misbehaving client costs only its own call: a failed write is answered inline. The price is
one writer per file at a time (tmpfs takes the inode lock): about 5 GB/s instead of about 9 with
parallel memmove on a 2-core machine. CPU-tier hits of a same-host client skip this copy anyway
(mapped GetPages, cachestore/shm/leases.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from kvmesh.cachestore.bulk_pool import map_chunked
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.maps import SegmentMaps, SegmentUnusable
from kvmesh.cachestore.store.page_access import is_intact
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)
MAX_MAPPED_SEGMENTS = 32


class SegmentWriter:
    """Thread-safe. Owns the cached mappings (closed by `close`); never owns the files."""

    def __init__(
        self, shm_dir: str = segments.SHM_DIR, max_segments: int = MAX_MAPPED_SEGMENTS
    ) -> None:
        self._maps = SegmentMaps(shm_dir, max_segments, map_files=False)
        self._reasons_logged: set[str] = set()

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
        the pages are unchecked: each is checked (codec header, key, checksum) right before it is
        written, while it is in cache; a page that fails is not written, reads as not found and
        its key goes to `on_bad`. The caller's page buffers stay alive for the call."""
        if not segments.is_local_peer(peer):
            return self._decline("peer is not on this host", peer)
        found = [memoryview(b).cast("B") for b in blobs if b is not None]
        sizes = [page.nbytes for page in found]
        is_found = [b is not None for b in blobs]
        if sum(sizes) > segment.capacity:
            return store_pb2.GetPagesHeader(
                is_found=is_found, page_nbytes=sizes, segment_nbytes_needed=sum(sizes)
            )
        mapped = None
        if found:
            try:
                mapped = self._maps.acquire(segment.name, segment.capacity)
            except SegmentUnusable as exc:
                return self._decline(exc.reason, exc.detail)
        offsets, offset = [], 0
        for size in sizes:
            offsets.append(offset)
            offset += size
        ok = [True] * len(found)
        if mapped is not None:
            found_keys = (None if keys is None else
                          [key for key, b in zip(keys, blobs, strict=True) if b is not None])
            try:
                ok = _check_and_write(mapped.fd, found, offsets, found_keys)
            except OSError as exc:  # shrunk, full, ...: this call goes inline, nothing else
                return self._decline("cannot write into segment", f"{segment.name}: {exc}")
            finally:
                self._maps.release(mapped)
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
        self._maps.close()

    def _decline(self, reason: str, detail: str) -> store_pb2.GetPagesHeader | None:
        """None (answer inline), logging why once per reason."""
        if reason not in self._reasons_logged:  # once per reason: a bad client must not flood
            self._reasons_logged.add(reason)
            log.info("GetPages answers inline: %s (%s)", reason, detail)
        return None


def _check_and_write(fd: int, pages: Sequence[memoryview], offsets: Sequence[int],
                     keys: Sequence[bytes] | None) -> list[bool]:
    """pwrite each page at its offset into the file `fd`, after checking it against its key
    when `keys` are given (a page that fails is not written): on the bulk thread pool (the
    checksum and pwrite release the GIL, so checks overlap the writes). Raises OSError."""

    def run(indices: range) -> list[bool]:
        ok = []
        for j in indices:
            is_good = keys is None or is_intact(keys[j], pages[j])
            if is_good:
                _pwrite_all(fd, pages[j], offsets[j])
            ok.append(is_good)
        return ok

    return map_chunked(run, len(pages), sum(page.nbytes for page in pages))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote {written} bytes at offset {offset}")
        data, offset = data[written:], offset + written
