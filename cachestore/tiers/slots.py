"""Page slots for the CpuTier: arenas of equal-size slots, one allocation per arena.

An arena is cut into slots of one page size (a model's pages all have one size). A page size's
arenas start at about 8 slots and double, up to the largest arena (256 MiB, or about an eighth
of the capacity in a smaller tier); pinned arenas fill the power of two torch's pinned allocator
rounds them up to. All arenas together stay within the tier's capacity plus one largest arena.

Arenas are made once and live until `close`: a slot comes back when the array `take` returned is
garbage (the tier dropped the page and every view of it is gone: a weakref finalizer) and is
handed out again, and an arena whose slots are all free stays, to be cut again for another page
size once the budget allows no new arena. So memory is registered (pinned, mapped by clients,
registered with a transfer engine through `on_new_arena`) once per arena, not once per page.

Arena memory is one of:
- "pinned": page-locked (torch), so a host -> GPU copy of a page runs by DMA (a worker's tier);
- "plain": an anonymous private mapping (numpy over mmap: page-aligned, no torch in the store
  process, its pages back to the system when the arena goes, never fragmenting malloc's heap);
- "shared": a file in /dev/shm (cachestore/shm/segments.py), which a same-host client maps to
  read pages with no copy (a store server's tier; see cachestore/shm/leases.py). `locate` says which
  arena file and offset hold a page. The files are unlinked at `close` and at exit. Where
  /dev/shm has no room an arena falls back to plain memory.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import mmap
import threading
import weakref
from collections.abc import Callable
from typing import Literal

import numpy as np

from kvmesh.cachestore.shm import segments

log = logging.getLogger(__name__)

ARENA_NBYTES = 256 << 20  # a power of two: torch's pinned allocator rounds sizes up to one
MIN_ARENA_NBYTES = 4 << 20  # the largest arena of a small tier is at least this (or capacity)
FIRST_SLOTS = 8  # at least this many slots in a page size's first arena; then twice as many

Memory = Literal["pinned", "plain", "shared"]
ArenaCallback = Callable[[int, int, int], None]  # (arena_id, address, nbytes)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def pow2_at_most(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def max_arena_nbytes(capacity_bytes: int) -> int:
    """The largest arena of a tier: at most an eighth of its capacity (the budget's slack above
    the capacity), between MIN_ARENA_NBYTES (or the capacity) and ARENA_NBYTES."""
    floor = min(MIN_ARENA_NBYTES, pow2_at_least(capacity_bytes))
    return min(ARENA_NBYTES, max(floor, pow2_at_most(capacity_bytes // 8)))


class _Arena:
    """One buffer of `nbytes`, cut into `count` slots of `slot_nbytes` (recut only while every
    slot is free); `segment` when it is a shared file."""

    def __init__(self, arena_id: int, nbytes: int, memory: Memory, shm_dir: str) -> None:
        self.arena_id, self.nbytes = arena_id, nbytes
        self.segment: segments.Segment | None = None
        if memory == "shared":
            try:
                self.segment = segments.create_segment(nbytes, shm_dir)
            except OSError as exc:  # e.g. /dev/shm full: unmappable, still a working arena
                log.warning("no shared-memory arena of %d bytes (%s): plain memory", nbytes, exc)
        if self.segment is not None:
            self.array = np.frombuffer(self.segment.mm, dtype=np.uint8)
        elif memory == "pinned":
            import torch  # only a worker's tier pins: a store process never imports torch here

            self.array = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        else:  # (raises OSError when the system has no memory for it)
            self.array = np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE),
                                       dtype=np.uint8)
        self.address = int(self.array.ctypes.data)
        self.slot_nbytes = self.count = 0
        self.free: list[int] = []

    def cut(self, slot_nbytes: int) -> None:
        """Slots of `slot_nbytes`, all free. Caller: no slot is taken."""
        assert len(self.free) == self.count and slot_nbytes <= self.nbytes
        self.slot_nbytes, self.count = slot_nbytes, self.nbytes // slot_nbytes
        # a heap: the lowest free slot goes first, so pages stored together after others were
        # deleted (in any order) still take consecutive, ascending slots (loaded back as one
        # copy per run)
        self.free = list(range(self.count))

    @property
    def is_idle(self) -> bool:
        return len(self.free) == self.count

    def unlink(self) -> None:
        """Remove the arena's file (mappings, ours and clients', live on until unmapped)."""
        if self.segment is not None:
            self.segment.remove_file()


class PageSlots:
    """Slots for pages, by page size; thread-safe. `take` has no slot (None) once all arenas
    would pass the budget (capacity plus one largest arena) and no idle arena is large enough,
    or the memory cannot be had. `on_new_arena(arena_id, address, nbytes)` runs once per arena
    made, under the slots' lock, before any of its slots is handed out (set it, then read
    `arenas()`: an arena made meanwhile may be in both)."""

    def __init__(self, capacity_bytes: int, memory: Memory, shm_dir: str = segments.SHM_DIR,
                 on_new_arena: ArenaCallback | None = None) -> None:
        self.memory = memory
        self.on_new_arena = on_new_arena
        self._shm_dir = shm_dir
        self.max_arena_nbytes = max_arena_nbytes(capacity_bytes)
        self.budget = capacity_bytes + self.max_arena_nbytes
        self._nbytes = 0  # in all arenas
        self._num_made = 0  # arenas made: the next arena_id
        # reentrant: a garbage collection inside take() may run _give_back on this thread
        self._lock = threading.RLock()
        self._arenas: list[_Arena] = []  # by arena_id
        self._by_size: dict[int, list[_Arena]] = {}  # slot size -> arenas cut to it
        self._shared: list[tuple[int, _Arena]] = []  # (address, arena) of shared arenas, sorted
        self._paths: set[str] = set()  # shared arena files to unlink at close or exit
        self._finalizer = weakref.finalize(self, segments.unlink_all, self._paths)

    def take(self, nbytes: int) -> np.ndarray | None:
        """A writable array of `nbytes` in a free slot, or None."""
        taken = self.take_many(1, nbytes)
        return taken[0][0] if taken else None

    def take_many(self, num_slots: int, nbytes: int) -> list[tuple[np.ndarray, int]]:
        """Up to `num_slots` free slots of `nbytes` (fewer when the budget runs out), as
        (writable array, its address), under one lock."""
        picked: list[tuple[_Arena, int]] = []
        with self._lock:
            while len(picked) < num_slots:
                arenas = self._by_size.get(nbytes, [])
                arena = next((a for a in arenas if a.free), None)
                if arena is None:
                    arena = self._new_arena(nbytes, len(arenas))
                if arena is None:
                    arena = self._recut_idle(nbytes)
                if arena is None:
                    break
                while arena.free and len(picked) < num_slots:
                    picked.append((arena, heapq.heappop(arena.free)))
        out = []
        for arena, slot in picked:
            view = arena.array[slot * nbytes : (slot + 1) * nbytes]
            weakref.finalize(view, self._give_back, arena, slot).atexit = False
            out.append((view, arena.address + slot * nbytes))
        return out

    def _new_arena(self, nbytes: int, num_arenas: int) -> _Arena | None:
        """A new arena cut to `nbytes` slots (twice the slots of the size's last one), within
        the budget; None past it. Caller holds the lock."""
        want = min(self.max_arena_nbytes, pow2_at_least(nbytes * (FIRST_SLOTS << num_arenas)))
        arena_nbytes = nbytes * max(1, want // nbytes)
        if self.memory == "pinned":  # torch allocates the power of two anyway: cut all of it
            arena_nbytes = pow2_at_least(arena_nbytes)
        if self._nbytes + arena_nbytes > self.budget:
            return None
        try:
            arena = _Arena(self._num_made, arena_nbytes, self.memory, self._shm_dir)
        except (RuntimeError, OSError):  # no (pinned) memory left: the page goes elsewhere
            return None
        self._num_made += 1
        self._nbytes += arena.nbytes
        self._arenas.append(arena)
        if arena.segment is not None:
            bisect.insort(self._shared, (arena.address, arena), key=lambda entry: entry[0])
            self._paths.add(arena.segment.path)
        self._cut(arena, nbytes)
        if self.on_new_arena is not None:
            self.on_new_arena(arena.arena_id, arena.address, arena.nbytes)
        return arena

    def _recut_idle(self, nbytes: int) -> _Arena | None:
        """The smallest arena of another page size with every slot free that holds an `nbytes`
        page, cut to `nbytes` slots; None when there is none. Caller holds the lock."""
        idle = [a for a in self._arenas
                if a.is_idle and a.slot_nbytes != nbytes and a.nbytes >= nbytes]
        if not idle:
            return None
        arena = min(idle, key=lambda a: a.nbytes)
        self._by_size[arena.slot_nbytes].remove(arena)
        if not self._by_size[arena.slot_nbytes]:
            del self._by_size[arena.slot_nbytes]
        self._cut(arena, nbytes)
        return arena

    def _cut(self, arena: _Arena, nbytes: int) -> None:
        arena.cut(nbytes)
        self._by_size.setdefault(nbytes, []).append(arena)

    def _give_back(self, arena: _Arena, slot: int) -> None:
        with self._lock:
            heapq.heappush(arena.free, slot)

    def locate(self, address: int, nbytes: int) -> tuple[str, int, int] | None:
        """(arena file name, offset in it, arena size) of the bytes at `address`, when they lie
        in a shared arena; else None."""
        place = self.shared_arena(address, nbytes)
        return None if place is None else place[1:]

    def shared_arena(self, address: int, nbytes: int) -> tuple[int, str, int, int] | None:
        """(arena_id, arena file name, offset in it, arena size) of the bytes at `address`,
        when they lie in a shared arena; else None."""
        with self._lock:
            i = bisect.bisect_right(self._shared, address, key=lambda entry: entry[0]) - 1
            if i < 0:
                return None
            start, arena = self._shared[i]
            if address + nbytes > start + arena.nbytes:
                return None
            assert arena.segment is not None
            return arena.arena_id, arena.segment.name, address - start, arena.nbytes

    def arenas(self) -> list[tuple[int, int, int]]:
        """(arena_id, address, nbytes) of every arena, oldest first (each lives until close)."""
        with self._lock:
            return [(a.arena_id, a.address, a.nbytes) for a in self._arenas]

    def close(self) -> None:
        """Unlink every shared arena file and forget the arenas (their memory goes once no page
        uses it)."""
        with self._lock:
            for _, arena in self._shared:
                arena.unlink()
            self._shared = []
            self._arenas, self._by_size = [], {}  # still counted in nbytes: no more are made
            if self.memory == "shared":  # later arenas would have no one to unlink them
                self.memory = "plain"
        self._finalizer()

    @property
    def num_arenas(self) -> int:
        with self._lock:
            return len(self._arenas)

    @property
    def num_free_slots(self) -> int:
        with self._lock:
            return sum(len(a.free) for a in self._arenas)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes
