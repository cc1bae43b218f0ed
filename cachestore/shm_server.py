"""Server side of shared-memory GetPages: map a same-host client's segment and write pages into it.

Only peers on loopback or a unix socket qualify, and only segments cachestore/shm_maps.py will
map (`kvmesh-<hex>` in /dev/shm, regular files of the claimed capacity). Anything else reads as
"cannot", and the caller answers with inline data frames: bad input never fails the call.
Mappings are cached per name and dropped when their file is unlinked (the client closed or
replaced it) or the server stops; the server never unlinks a segment.

A same-user process that truncates its segment while the server writes could still raise SIGBUS
here; the size is re-checked right before every write, which leaves only that deliberate race.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from collections.abc import Callable, Sequence

from kvmesh.cachestore import shm
from kvmesh.cachestore.codec import map_chunked
from kvmesh.cachestore.page_access import is_intact
from kvmesh.cachestore.shm_maps import SegmentMaps, SegmentUnusable
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)
MAX_MAPPED_SEGMENTS = 32


class SegmentWriter:
    """Thread-safe. Owns the cached mappings (closed by `close`); never owns the files."""

    def __init__(self, shm_dir: str = shm.SHM_DIR, max_segments: int = MAX_MAPPED_SEGMENTS) -> None:
        self._maps = SegmentMaps(shm_dir, max_segments)
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
