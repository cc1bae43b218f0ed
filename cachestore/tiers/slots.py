"""Page slots for the CpuTier: arenas of equal-size slots, one allocation per arena.

An arena holds pages of one size (a model's pages all have one size). A page size's arenas start
at about 8 slots and double, up to 256 MiB, each filling the power of two torch's pinned
allocator would round it up to; all arenas together stay within the tier's capacity plus one
largest arena. A slot comes back when the array `take` returned is garbage (the tier dropped
the page and every view of it is gone: a weakref finalizer), and an arena whose slots are all
free is let go.

Arena memory is one of:
- "pinned": page-locked (torch), so a host -> GPU copy of a page runs by DMA (a worker's tier);
- "plain": ordinary process memory;
- "shared": a file in /dev/shm (cachestore/shm/segments.py), which a same-host client maps to
  read pages with no copy (a store server's tier; see cachestore/shm/leases.py). `locate` says which
  arena file and offset hold a page. The files are unlinked when their arena goes, at `close`,
  and at exit. Where /dev/shm has no room an arena falls back to plain memory.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import threading
import weakref
from typing import Literal

import numpy as np

from kvmesh.cachestore.shm import segments

log = logging.getLogger(__name__)

ARENA_NBYTES = 256 << 20  # a power of two: torch's pinned allocator rounds sizes up to one
FIRST_SLOTS = 8  # at least this many slots in a page size's first arena; then twice as many

Memory = Literal["pinned", "plain", "shared"]


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _Arena:
    """One buffer cut into `count` slots of `slot_nbytes`; `segment` when it is a shared file."""

    def __init__(self, slot_nbytes: int, count: int, memory: Memory, shm_dir: str) -> None:
        self.slot_nbytes, self.count = slot_nbytes, count
        self.nbytes = slot_nbytes * count
        self.segment: segments.Segment | None = None
        if memory == "shared":
            try:
                self.segment = segments.create_segment(self.nbytes, shm_dir)
            except OSError as exc:  # e.g. /dev/shm full: unmappable, still a working arena
                log.warning("no shared-memory arena of %d bytes (%s): plain memory", self.nbytes,
                            exc)
        if self.segment is not None:
            self.array = np.frombuffer(self.segment.mm, dtype=np.uint8)
        else:
            import torch

            tensor = torch.empty(self.nbytes, dtype=torch.uint8,
                                 pin_memory=memory == "pinned")
            self.array = tensor.numpy()
        self.address = int(self.array.ctypes.data)
        # a heap: the lowest free slot goes first, so pages stored together after others were
        # deleted (in any order) still take consecutive, ascending slots (loaded back as one
        # copy per run)
        self.free = list(range(count))

    def unlink(self) -> None:
        """Remove the arena's file (mappings, ours and clients', live on until unmapped)."""
        if self.segment is not None:
            self.segment.remove_file()


class PageSlots:
    """Slots for pages, by page size; thread-safe. `take` has no slot (None) once all arenas
    would pass the budget (capacity plus one largest arena) or the memory cannot be had."""

    def __init__(
        self, capacity_bytes: int, memory: Memory, shm_dir: str = segments.SHM_DIR
    ) -> None:
        self.memory = memory
        self._shm_dir = shm_dir
        self._max_arena_nbytes = min(ARENA_NBYTES, pow2_at_least(capacity_bytes))
        self._budget = capacity_bytes + self._max_arena_nbytes
        self._nbytes = 0  # in all arenas
        # reentrant: a garbage collection inside take() may run _give_back on this thread
        self._lock = threading.RLock()
        self._arenas: dict[int, list[_Arena]] = {}  # slot size -> arenas of that size
        self._shared: list[tuple[int, _Arena]] = []  # (address, arena) of shared arenas, sorted
        self._paths: set[str] = set()  # shared arena files to unlink at close or exit
        self._finalizer = weakref.finalize(self, segments.unlink_all, self._paths)

    def take(self, nbytes: int) -> np.ndarray | None:
        """A writable array of `nbytes` in a free slot, or None."""
        with self._lock:
            arenas = self._arenas.setdefault(nbytes, [])
            arena = next((a for a in arenas if a.free), None)
            if arena is None:
                arena = self._new_arena(nbytes, len(arenas))
                if arena is None:
                    if not arenas:
                        del self._arenas[nbytes]
                    return None
                arenas.append(arena)
            slot = heapq.heappop(arena.free)
        view = arena.array[slot * nbytes : (slot + 1) * nbytes]
        weakref.finalize(view, self._give_back, arena, slot).atexit = False
        return view

    def _new_arena(self, nbytes: int, num_arenas: int) -> _Arena | None:
        want = nbytes * (FIRST_SLOTS << num_arenas)
        count = max(1, min(self._max_arena_nbytes, pow2_at_least(want)) // nbytes)
        if self._nbytes + nbytes * count > self._budget:
            return None
        try:
            arena = _Arena(nbytes, count, self.memory, self._shm_dir)
        except RuntimeError:  # no pinned memory left: the caller stores the page otherwise
            return None
        self._nbytes += arena.nbytes
        if arena.segment is not None:
            bisect.insort(self._shared, (arena.address, arena), key=lambda entry: entry[0])
            self._paths.add(arena.segment.path)
        return arena

    def _give_back(self, arena: _Arena, slot: int) -> None:
        with self._lock:
            heapq.heappush(arena.free, slot)
            arenas = self._arenas.get(arena.slot_nbytes)
            if len(arena.free) == arena.count and arenas is not None and arena in arenas:
                arenas.remove(arena)  # the last reference to its memory goes with it
                self._nbytes -= arena.nbytes
                if not arenas:
                    del self._arenas[arena.slot_nbytes]
                self._forget_shared(arena)

    def _forget_shared(self, arena: _Arena) -> None:
        if arena.segment is not None:
            self._shared = [entry for entry in self._shared if entry[1] is not arena]
            self._paths.discard(arena.segment.path)
            arena.unlink()

    def locate(self, address: int, nbytes: int) -> tuple[str, int, int] | None:
        """(arena file name, offset in it, arena size) of the bytes at `address`, when they lie
        in a shared arena; else None."""
        with self._lock:
            i = bisect.bisect_right(self._shared, address, key=lambda entry: entry[0]) - 1
            if i < 0:
                return None
            start, arena = self._shared[i]
            if address + nbytes > start + arena.nbytes:
                return None
            assert arena.segment is not None
            return arena.segment.name, address - start, arena.nbytes

    def close(self) -> None:
        """Unlink every shared arena file (the arenas' memory goes once no page uses it)."""
        with self._lock:
            for _, arena in self._shared:
                arena.unlink()
            self._shared = []
            if self.memory == "shared":  # later arenas would have no one to unlink them
                self.memory = "plain"
        self._finalizer()

    @property
    def num_arenas(self) -> int:
        with self._lock:
            return sum(len(arenas) for arenas in self._arenas.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes
