"""Host-memory tier: encoded pages held in process memory, LRU by bytes.

A page's memory is never overwritten while anyone holds it: eviction only drops the tier's
reference, so a reader that got a page keeps a valid buffer for as long as it holds it (no pin
counts to manage).

With `pin_memory=True` (the default when CUDA is present) pages are copied once into page-locked
memory, so a host->GPU copy of a payload runs asynchronously at full PCIe speed. Pinned pages
(and, with `shared=True`, pages in /dev/shm files that same-host clients map: a store server's
tier) lie in arenas of equal-size slots (cachestore/tiers/slots.py): one allocation per arena
instead of per page, which torch would round up to a power of two (a 512 KiB + header page took
1 MiB), and consecutive pages of a prefix often land in consecutive slots; a page that finds no
slot gets a pinned allocation of its own (or bytes). `get_many` returns a read-only memoryview
of the page's slot; the slot is reused only once the tier has dropped the page and the last
view of it is gone. Otherwise pages are plain `bytes`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.segments import buffer_address
from kvmesh.cachestore.tiers.base import Page, Tier, TierStats
from kvmesh.cachestore.tiers.lru import LruIndex
from kvmesh.cachestore.tiers.slots import ArenaCallback, Memory, PageSlots


class ReservedSlot(NamedTuple):
    """A free slot handed to a writer (CpuTier.reserve_slots): `array` to fill ([nbytes]
    uint8), `view` (read-only) to put under the page's key, `address` of its first byte."""

    array: np.ndarray
    view: memoryview
    address: int


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _to_pinned(blob: bytes | memoryview) -> memoryview:
    """A page in a pinned allocation of its own (torch rounds it up to a power of two): for
    pages that find no slot. Read-only, like bytes pages; the view keeps the tensor alive."""
    import torch

    src = memoryview(blob).cast("B")
    host = torch.empty(src.nbytes, dtype=torch.uint8, pin_memory=True)
    host.numpy()[:] = src
    return host.numpy().data.toreadonly()


class CpuTier(Tier):
    """Thread-safe host-memory tier. `put_many` returns evicted pages for demotion; a page
    larger than the whole capacity is not stored and is returned as evicted right away."""

    name = "cpu"

    def __init__(self, capacity_bytes: int, pin_memory: bool | None = None,
                 slots: bool | None = None, shared: bool = False,
                 shm_dir: str = segments.SHM_DIR,
                 on_new_arena: ArenaCallback | None = None) -> None:
        """`slots`: keep pages in arena slots (default: when pinned or shared; unpinned plain
        slots are for tests where no CUDA is). `shared`: arenas are files in `shm_dir` that
        same-host clients may map (`locate_many`); not with pinning. `on_new_arena(arena_id,
        address, nbytes)`: runs once per slot arena made (e.g. to register it with a transfer
        engine), before any page lies in it; also settable later (`on_new_arena`)."""
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise InvalidConfig(f"cpu tier capacity_bytes must be a positive int, "
                                f"got {capacity_bytes!r}")
        self.is_pinned = _cuda_available() and not shared if pin_memory is None else pin_memory
        if shared and self.is_pinned:
            raise InvalidConfig("a cpu tier is either pinned or shared, not both")
        memory: Memory = "shared" if shared else "pinned" if self.is_pinned else "plain"
        use_slots = shared or self.is_pinned if slots is None else slots
        self._slots = (PageSlots(capacity_bytes, memory, shm_dir, on_new_arena) if use_slots
                       else None)
        self._lock = threading.Lock()
        self._lru = LruIndex(capacity_bytes)
        self._pages: dict[bytes, bytes | memoryview] = {}
        self._addresses: dict[bytes, int] = {}  # where a slot page lies (its slot's address)
        # slots handed out by reserve_slots, by id of their view: a page put as one is kept
        # in place
        self._reserved: dict[int, ReservedSlot] = {}
        self._stats = TierStats(name=self.name, capacity_bytes=capacity_bytes)

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._pages for key in keys]

    def count_leading(self, keys: Sequence[bytes]) -> int:
        """How many of the leading keys this tier holds, up to the first it does not (no hit or
        miss counted, nothing touched)."""
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._pages:
                    return i
            return len(keys)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        return self._get(keys, leading=False)[0]

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
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
            stored, address = self._copy_in(blob)
            with self._lock:
                if self._lru.touch(key):  # another thread stored it meanwhile
                    continue
                for victim in self._lru.victims_for(nbytes):
                    self._lru.remove(victim)
                    evicted.append((victim, self._pages.pop(victim)))
                    self._addresses.pop(victim, None)
                    self._stats.evictions += 1
                self._lru.add(key, nbytes)
                self._pages[key] = stored
                if address is not None:
                    self._addresses[key] = address
        return evicted

    def _copy_in(self, blob: bytes | memoryview) -> tuple[bytes | memoryview, int | None]:
        """(the page as the tier keeps it, its slot's address or None): copied into a slot, as a
        read-only view (like bytes pages: readers cannot scribble on a stored page; the view
        keeps the slot taken), else into a pinned allocation of its own when pinned, else as
        bytes. Callers must never release() a page they got: the slot could be reused while
        the tier still lists it."""
        if self._reserved:
            with self._lock:  # (an id in the table is that view's: the table keeps it alive)
                reserved = self._reserved.pop(id(blob), None)
            if reserved is not None:
                return reserved.view, reserved.address  # written in place
        src = memoryview(blob).cast("B")
        slot = self._slots.take(src.nbytes) if self._slots is not None and src.nbytes else None
        if slot is not None:
            slot[:] = src
            return slot.data.toreadonly(), int(slot.ctypes.data)
        if self.is_pinned and src.nbytes:
            return _to_pinned(src), None
        return _owned_bytes(blob), None

    @property
    def slots(self) -> PageSlots | None:
        """The arenas pages lie in (None: pages are objects of their own)."""
        return self._slots

    def reserve_slots(self, num_slots: int, nbytes: int) -> list[ReservedSlot]:
        """Up to `num_slots` free slots of `nbytes` (fewer when memory runs out), for a writer
        to fill in place: a page later put through put_many as a reserved slot's `view` is
        kept there, not copied. The caller ends each reservation with `unreserve`."""
        taken = (self._slots.take_many(num_slots, nbytes)
                 if self._slots is not None and nbytes else [])
        out = [ReservedSlot(array, array.data.toreadonly(), address) for array, address in taken]
        with self._lock:
            self._reserved.update((id(slot.view), slot) for slot in out)
        return out

    def unreserve(self, slots: Sequence[ReservedSlot]) -> None:
        """End reservations: a slot not kept by a page goes back once the caller drops it."""
        with self._lock:
            for slot in slots:
                self._reserved.pop(id(slot.view), None)

    def touch_many(self, keys: Sequence[bytes]) -> None:
        """Make these pages the most recently used, the last key most (no hit counted)."""
        with self._lock:
            for key in keys:
                self._lru.touch(key)

    def get_leading_addressed(self, keys: Sequence[bytes]
                              ) -> tuple[list[bytes | memoryview], list[int | None]]:
        """The pages of the leading keys this tier holds, up to the first it does not (not
        counted as a miss: a prefix simply ends there), and each one's address where the tier
        knows it (slot pages) without asking the buffer (None elsewhere)."""
        pages, addresses = self._get(keys, leading=True)
        return [page for page in pages if page is not None], addresses  # (none is: leading)

    def _get(self, keys: Sequence[bytes], leading: bool
             ) -> tuple[list[bytes | memoryview | None], list[int | None]]:
        """One locked pass: found pages are touched and counted as hits; a missing key is a
        miss (None), or ends the pass when `leading`."""
        pages: list[bytes | memoryview | None] = []
        addresses: list[int | None] = []
        with self._lock:
            for key in keys:
                blob = self._pages.get(key)
                if blob is None:
                    if leading:
                        break
                    self._stats.misses += 1
                else:
                    self._lru.touch(key)
                    self._stats.hits += 1
                pages.append(blob)
                addresses.append(self._addresses.get(key) if blob is not None else None)
        return pages, addresses

    def arenas(self) -> list[tuple[int, int, int]]:
        """(arena_id, address, nbytes) of every slot arena, oldest first; none without slots.
        An arena lives (same address, never freed) until `close`; read-only."""
        return self._slots.arenas() if self._slots is not None else []

    @property
    def on_new_arena(self) -> ArenaCallback | None:
        """Runs once per slot arena made from now on (`arenas()` lists the earlier ones)."""
        return self._slots.on_new_arena if self._slots is not None else None

    @on_new_arena.setter
    def on_new_arena(self, callback: ArenaCallback | None) -> None:
        if self._slots is not None:
            self._slots.on_new_arena = callback

    @property
    def is_shared(self) -> bool:
        """Pages lie in /dev/shm arena files that same-host clients may map."""
        return self._slots is not None and self._slots.memory == "shared"

    def locate_many(self, pages: Sequence[bytes | memoryview],
                    keys: Sequence[bytes] | None = None) -> list[tuple[str, int, int] | None]:
        """Per page this tier handed out: (shared arena file name, offset, arena size) when it
        lies in a shared arena, else None. With the pages' `keys`, a page the tier still holds
        under its key is found by the address kept for it (no buffer asked)."""
        if not self.is_shared:
            return [None] * len(pages)
        assert self._slots is not None
        if keys is None:
            known: list[int | None] = [None] * len(pages)
        else:
            with self._lock:
                known = [self._addresses.get(key) if self._pages.get(key) is page else None
                         for key, page in zip(keys, pages, strict=True)]
        out: list[tuple[str, int, int] | None] = []
        for page, address in zip(pages, known, strict=True):
            view = memoryview(page)
            if not view.nbytes:
                out.append(None)
                continue
            if address is None:
                address = buffer_address(view)[0]
            out.append(self._slots.locate(address, view.nbytes))
        return out

    def arenas_of(self, keys: Sequence[bytes]) -> dict[str, int]:
        """{shared arena file name: its size} of the arenas holding these keys' pages (no
        recency or hit counting)."""
        with self._lock:
            held = [(key, self._pages[key]) for key in keys if key in self._pages]
        places = self.locate_many([page for _, page in held], [key for key, _ in held])
        return {name: nbytes for place in places if place is not None
                for name, _, nbytes in [place]}

    def delete_many(self, keys: Sequence[bytes]) -> int:
        num_deleted = 0
        with self._lock:
            for key in keys:
                if self._lru.remove(key) is not None:
                    del self._pages[key]
                    self._addresses.pop(key, None)
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
            self._addresses.clear()
            self._lru = LruIndex(self._lru.capacity_bytes)
        if self._slots is not None:
            self._slots.close()


def _owned_bytes(blob: bytes | memoryview) -> bytes:
    """The page as an immutable object the tier may keep: bytes as-is, anything else copied."""
    return blob if isinstance(blob, bytes) else bytes(blob)
