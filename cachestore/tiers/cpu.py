"""Host-memory tier: encoded pages held in process memory, LRU by bytes.

A page's memory is never overwritten while anyone holds it: eviction only drops the tier's
reference, so a reader that got a page keeps a valid buffer for as long as it holds it (no pin
counts to manage).

With `pin_memory=True` (the default when CUDA is present) pages are copied once into page-locked
memory, so a host->GPU copy of a payload runs asynchronously at full PCIe speed. Page-locked
memory comes in arenas of equal-size slots (one arena holds pages of one size; a model's pages
all have one size): one torch pinned allocation per arena instead of per page, which torch
would round up to a power of two (a 512 KiB + header page took 1 MiB), and consecutive pages
of a prefix often land in consecutive slots. A page size's arenas start at about 8 slots and
double, up to 256 MiB, each filling the power of two torch allocates; all arenas stay within
the capacity plus one arena, and a page that finds no slot gets a pinned allocation of its
own. `get_many` returns a read-only memoryview of the page's slot; the slot is reused only once
the tier has dropped the page and the last view of it is gone (a weakref finalizer on the
slot's array). An arena whose slots are all free goes
back to torch's pinned-memory cache. Without CUDA pages are plain `bytes`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

from cachestore.errors import InvalidConfig
from cachestore.tiers.base import Tier, TierStats
from cachestore.tiers.lru import LruIndex


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


_ARENA_NBYTES = 256 << 20  # a power of two: torch's pinned allocator rounds sizes up to one
_FIRST_SLOTS = 8  # at least this many slots in a page size's first arena; then twice as many


def _to_pinned(blob: bytes | memoryview) -> memoryview:
    """A page in a pinned allocation of its own (torch rounds it up to a power of two): for
    pages that find no slot. Read-only, like bytes pages; the view keeps the tensor alive."""
    import torch

    src = memoryview(blob).cast("B")
    host = torch.empty(src.nbytes, dtype=torch.uint8, pin_memory=True)
    host.numpy()[:] = src
    return host.numpy().data.toreadonly()


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _Arena:
    """One page-locked buffer cut into `count` slots of `slot_nbytes`."""

    def __init__(self, slot_nbytes: int, count: int, pin_memory: bool) -> None:
        import torch

        self.slot_nbytes, self.count = slot_nbytes, count
        self.nbytes = slot_nbytes * count
        self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        self.array = self.tensor.numpy()
        self.free = list(range(count - 1, -1, -1))  # pop() hands out slot 0 first


class _PinnedSlots:
    """Slots for pages, by page size; thread-safe. A slot comes back (and an empty arena goes
    back to torch's pinned-memory cache) when the array `take` returned is garbage: the tier
    dropped it and every view is gone. Arenas of a page size start small and double, each
    filled to the power of two torch allocates; all arenas together stay within the tier's
    capacity plus one largest arena, past which `take` has no slot (None)."""

    def __init__(self, capacity_bytes: int, pin_memory: bool) -> None:
        self._pin_memory = pin_memory
        self._max_arena_nbytes = min(_ARENA_NBYTES, _pow2_at_least(capacity_bytes))
        self._budget = capacity_bytes + self._max_arena_nbytes
        self._nbytes = 0  # in all arenas
        # reentrant: a garbage collection inside take() may run _give_back on this thread
        self._lock = threading.RLock()
        self._arenas: dict[int, list[_Arena]] = {}  # slot size -> arenas of that size

    def take(self, nbytes: int):  # -> np.ndarray of nbytes in a slot, or None
        with self._lock:
            arenas = self._arenas.setdefault(nbytes, [])
            arena = next((a for a in arenas if a.free), None)
            if arena is None:
                want = nbytes * (_FIRST_SLOTS << len(arenas))
                count = max(1, min(self._max_arena_nbytes, _pow2_at_least(want)) // nbytes)
                if self._nbytes + nbytes * count > self._budget:
                    if not arenas:
                        del self._arenas[nbytes]
                    return None
                try:
                    arena = _Arena(nbytes, count, self._pin_memory)
                except RuntimeError:  # no pinned memory left: the caller stores it otherwise
                    if not arenas:
                        del self._arenas[nbytes]
                    return None
                arenas.append(arena)
                self._nbytes += arena.nbytes
            slot = arena.free.pop()
        view = arena.array[slot * nbytes : (slot + 1) * nbytes]
        weakref.finalize(view, self._give_back, arena, slot).atexit = False
        return view

    def _give_back(self, arena: _Arena, slot: int) -> None:
        with self._lock:
            arena.free.append(slot)
            arenas = self._arenas.get(arena.slot_nbytes)
            if len(arena.free) == arena.count and arenas is not None and arena in arenas:
                arenas.remove(arena)  # the last reference to its memory goes with it
                self._nbytes -= arena.nbytes
                if not arenas:
                    del self._arenas[arena.slot_nbytes]

    @property
    def num_arenas(self) -> int:
        with self._lock:
            return sum(len(arenas) for arenas in self._arenas.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes


class CpuTier(Tier):
    """Thread-safe host-memory tier. `put_many` returns evicted pages for demotion; a page
    larger than the whole capacity is not stored and is returned as evicted right away."""

    name = "cpu"

    def __init__(self, capacity_bytes: int, pin_memory: bool | None = None,
                 slots: bool | None = None) -> None:
        """`slots`: keep pages in arena slots (default: when pinned); without pinning only to
        test them where no CUDA is."""
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise InvalidConfig(f"cpu tier capacity_bytes must be a positive int, "
                                f"got {capacity_bytes!r}")
        self.is_pinned = _cuda_available() if pin_memory is None else pin_memory
        use_slots = self.is_pinned if slots is None else slots
        self._slots = _PinnedSlots(capacity_bytes, self.is_pinned) if use_slots else None
        self._lock = threading.Lock()
        self._lru = LruIndex(capacity_bytes)
        self._pages: dict[bytes, bytes | memoryview] = {}
        self._stats = TierStats(name=self.name, capacity_bytes=capacity_bytes)

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._pages for key in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        out: list[bytes | memoryview | None] = []
        with self._lock:
            for key in keys:
                blob = self._pages.get(key)
                if blob is None:
                    self._stats.misses += 1
                else:
                    self._lru.touch(key)
                    self._stats.hits += 1
                out.append(blob)
        return out

    def put_many(self, pages: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        evicted: list[tuple[bytes, bytes | memoryview]] = []
        for key, blob in pages:
            nbytes = memoryview(blob).nbytes
            with self._lock:
                if self._lru.touch(key):
                    continue
                if not self._lru.fits(nbytes):
                    evicted.append((key, blob))
                    continue
            # Copy outside the lock: pinning or materializing a view can take a while.
            stored = self._copy_in(blob)
            with self._lock:
                if self._lru.touch(key):  # another thread stored it meanwhile
                    continue
                for victim in self._lru.victims_for(nbytes):
                    self._lru.remove(victim)
                    evicted.append((victim, self._pages.pop(victim)))
                    self._stats.evictions += 1
                self._lru.add(key, nbytes)
                self._pages[key] = stored
        return evicted  # type: ignore[return-value]  # pinned pages are memoryviews

    def _copy_in(self, blob: bytes | memoryview) -> bytes | memoryview:
        """The page as the tier keeps it: copied into a slot, as a read-only view (like bytes
        pages: readers cannot scribble on a stored page; the view keeps the slot taken), else
        into a pinned allocation of its own when pinned, else as bytes. Callers must never
        release() a page they got: the slot could be reused while the tier still lists it."""
        src = memoryview(blob).cast("B")
        slot = self._slots.take(src.nbytes) if self._slots is not None and src.nbytes else None
        if slot is not None:
            slot[:] = src
            return slot.data.toreadonly()
        if self.is_pinned and src.nbytes:
            return _to_pinned(src)
        return _owned_bytes(blob)

    def delete_many(self, keys: Sequence[bytes]) -> int:
        num_deleted = 0
        with self._lock:
            for key in keys:
                if self._lru.remove(key) is not None:
                    del self._pages[key]
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
                             s.hits, s.misses, s.evictions, s.errors, True)

    def close(self) -> None:
        with self._lock:
            self._pages.clear()
            self._lru = LruIndex(self._lru.capacity_bytes)


def _owned_bytes(blob: bytes | memoryview) -> bytes:
    """The page as an immutable object the tier may keep: bytes as-is, anything else copied."""
    return blob if isinstance(blob, bytes) else bytes(blob)
