"""The client's side of the NIXL data plane: one agent (no progress thread: the caller polls its
own transfers), a pool of registered buffers reused across calls, and READs/WRITEs between them
(or the caller's own memory, host or GPU, registered for that call or for good with
`register_region`) and a store's arenas. Knows nothing of gRPC: StoreClient (cachestore/rpc/)
asks the store where pages lie and hands the locations here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from kvmesh.cachestore.dataplane.agent import ArenaInfo, TransferTimeout, make_agent, wait_done

log = logging.getLogger(__name__)

MIN_BUFFER_NBYTES = 4 << 20
Location = tuple[int, int, int]  # (arena_id, offset, nbytes) in the store
BufferHook = Callable[[int, int], None]  # (address, nbytes)
# Where caller memory lies: None = host memory (NIXL "DRAM"), else the index of the CUDA device
# whose memory it is ("VRAM": UCX moves it with cuda_copy / cuda_ipc, or GPUDirect RDMA).
Device = int | None


def _mem_type(device: Device) -> tuple[str, int]:
    return ("DRAM", 0) if device is None else ("VRAM", device)


class RegisteredBuffer:
    """One registered host buffer; `array` is its memory ([nbytes] uint8)."""

    def __init__(self, array: np.ndarray, registration: Any) -> None:
        self.array, self.registration = array, registration
        self.address, self.nbytes = int(array.ctypes.data), array.nbytes
        self.is_retired = False  # a transfer into it could not be cancelled: never reused

    def view(self) -> memoryview:
        """The whole buffer, read-only."""
        return self.array.data.toreadonly()


@contextmanager
def _as_os_error(what: str) -> Iterator[None]:
    """nixl's errors (plain Exceptions: nixlNotFoundError, ...) as OSError, the one error this
    module raises for a transfer that could not be done."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        raise OSError(f"NIXL {what}: {type(exc).__name__}: {exc}") from exc


class Initiator:
    """Thread-safe: transfers run one at a time (the agent is driven from one thread at once).
    `connect` loads (or reloads, after the store registered new arenas) the store's metadata.
    Every NIXL failure raises OSError. `on_new_buffer(address, nbytes)` runs once per new
    registered buffer (a worker page-locks it: pages READ into it go to the GPU by DMA, with no
    staging copy), `on_release_buffer` before one is freed. `timeout` (seconds; None: none)
    bounds each transfer: one still in progress then is cancelled and raises OSError
    (TransferTimeout). The agent is used under `_lock`, held for each call into it but not
    across a transfer's wait, so one stalled transfer does not block the others."""

    def __init__(self, on_new_buffer: BufferHook | None = None,
                 on_release_buffer: BufferHook | None = None,
                 timeout: float | None = None) -> None:
        self.timeout = timeout
        self.agent: Any = make_agent(f"kvmesh-client-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                                progress_thread=False)
        self._lock = threading.Lock()  # the agent and the remote table
        self._pool_lock = threading.Lock()
        self._free: list[RegisteredBuffer] = []
        self._all: list[RegisteredBuffer] = []
        self._remote: bytes | None = None
        # caller memory registered until deregister_region / close: (address, nbytes, device,
        # registration)
        self._regions: list[tuple[int, int, Device, Any]] = []
        self._arenas: dict[int, ArenaInfo] = {}
        self.arena_epoch = -1
        self._on_new_buffer, self._on_release_buffer = on_new_buffer, on_release_buffer

    def connect(self, agent_metadata: bytes, arenas: Sequence[ArenaInfo], epoch: int) -> None:
        with self._lock, _as_os_error("loading the store's metadata"):
            self._remote = self.agent.add_remote_agent(agent_metadata)
            self._arenas = {arena.arena_id: arena for arena in arenas}
            self.arena_epoch = epoch

    def knows(self, places: Sequence[Location]) -> bool:
        """Every location lies in an arena this client has the metadata of."""
        with self._lock:
            return all(arena_id in self._arenas
                       and offset + nbytes <= self._arenas[arena_id].nbytes
                       for arena_id, offset, nbytes in places)

    # -- buffers ------------------------------------------------------------------------------

    def acquire(self, nbytes: int) -> RegisteredBuffer:
        """A registered buffer of at least `nbytes`, the caller's until `give_back`."""
        with self._pool_lock:
            fits = [b for b in self._free if b.nbytes >= nbytes]
            if fits:
                buffer = min(fits, key=lambda b: b.nbytes)
                self._free.remove(buffer)
                return buffer
        size = max(MIN_BUFFER_NBYTES, 1 << max(0, nbytes - 1).bit_length())
        array = np.empty(size, dtype=np.uint8)
        with self._lock, _as_os_error("registering a buffer"):
            registration = self.agent.register_memory([(int(array.ctypes.data), size, 0, "")],
                                                      "DRAM")
        buffer = RegisteredBuffer(array, registration)
        with self._pool_lock:
            self._all.append(buffer)
        if self._on_new_buffer is not None:
            try:  # (page-locking it, on CUDA): failing only makes reads from it slower
                self._on_new_buffer(buffer.address, buffer.nbytes)
            except Exception:
                log.warning("on_new_segment failed for a data-plane buffer", exc_info=True)
        return buffer

    def reserve(self, nbytes: int) -> None:
        """Make (and register) a buffer of `nbytes` now, off the path of the first get."""
        self.give_back(self.acquire(nbytes))

    def owns(self, address: int, nbytes: int, device: Device = None) -> bool:
        """[address, address + nbytes) of `device`'s memory lies in one of this initiator's
        registered buffers (host memory) or registered regions."""
        with self._pool_lock:
            return (device is None and any(b.address <= address
                                           and address + nbytes <= b.address + b.nbytes
                                           for b in self._all)
                    or any(start <= address and address + nbytes <= start + size and dev == device
                           for start, size, dev, _ in self._regions))

    def register_region(self, address: int, nbytes: int, device: Device = None) -> None:
        """Register caller memory (e.g. a worker's KV cache on a GPU) for every later transfer
        from or into it, until `deregister_region` or `close`: those register nothing per
        call. The caller keeps it allocated until then. Raises OSError when NIXL refuses it."""
        mem, dev = _mem_type(device)
        with self._lock, _as_os_error(f"registering {mem} memory"):
            registration = self.agent.register_memory([(address, nbytes, dev, "")], mem)
        with self._pool_lock:
            self._regions.append((address, nbytes, device, registration))

    def deregister_region(self, address: int) -> None:
        """Forget the region registered at `address` (no transfer may be using it)."""
        with self._pool_lock:
            gone = [r for r in self._regions if r[0] == address]
            self._regions = [r for r in self._regions if r[0] != address]
        with self._lock:
            for *_, registration in gone:
                self.agent.deregister_memory(registration)

    def give_back(self, buffer: RegisteredBuffer) -> None:
        if buffer.is_retired:  # (still registered, freed at close)
            return
        with self._pool_lock:
            self._free.append(buffer)

    # -- transfers ----------------------------------------------------------------------------

    def read(self, places: Sequence[Location], buffer: RegisteredBuffer) -> list[int]:
        """READ each location into `buffer`, back to back; returns each one's offset there."""
        offsets = _packed(places)
        self._transfer("READ", places, buffer, offsets)
        return offsets

    def write(self, places: Sequence[Location], buffer: RegisteredBuffer) -> None:
        """WRITE `buffer`'s bytes, laid out back to back, to the locations (flushed into the
        store's memory once this returns)."""
        self._transfer("WRITE", places, buffer, _packed(places))

    def write_from(self, places: Sequence[Location], sources: Sequence[int],
                   device: Device = None) -> None:
        """WRITE the bytes at local address sources[i] (places[i]'s nbytes, in `device`'s
        memory; the caller keeps them alive until this returns) to places[i], with no copy:
        ranges outside this initiator's buffers and regions are registered for this call only
        (~0.3 ms per 128 over UCX tcp, against a 5-25 ms copy into a buffer). Host memory the
        backend will not register is copied into a buffer first."""
        self._in_place("WRITE", places, sources, device)

    def read_into(self, places: Sequence[Location], destinations: Sequence[int],
                  device: Device = None) -> None:
        """READ places[i] to local address destinations[i] (in `device`'s memory, room for
        places[i]'s nbytes, kept alive by the caller until this returns), with no copy, as
        write_from registers. Host memory the backend will not register is READ into a
        buffer, then copied."""
        self._in_place("READ", places, destinations, device)

    def _in_place(self, op: str, places: Sequence[Location], addresses: Sequence[int],
                  device: Device) -> None:
        local = [(address, nbytes) for address, (_, _, nbytes) in zip(addresses, places,
                                                                       strict=True)]
        mem, dev = _mem_type(device)
        foreign = [(address, nbytes, dev, "") for address, nbytes in dict.fromkeys(local)
                   if not self.owns(address, nbytes, device)]
        with self._lock:
            try:
                registration = self.agent.register_memory(foreign, mem) if foreign else None
            except Exception as exc:  # nixl's errors are plain Exceptions
                if device is not None:  # no buffer of ours can stand in for device memory
                    raise OSError(f"NIXL {op}: registering {mem} memory: {exc}") from exc
                log.info("%s with unregistrable memory (%s): through a buffer", op, exc)
                registration, unregistrable = None, True
            else:
                unregistrable = False
        if not unregistrable:
            with _as_os_error(op):
                is_settled = True  # false only for a transfer NIXL could not cancel
                try:
                    self._post(op, local, places, device)
                except TransferTimeout as exc:
                    is_settled = exc.is_cancelled
                    raise
                finally:
                    if registration is not None and is_settled:
                        with self._lock:
                            self.agent.deregister_memory(registration)
                    elif registration is not None:  # NIXL may still use it: left registered
                        log.warning("a %s's registration is kept: its transfer is stuck", op)
            return
        buffer = self.acquire(sum(nbytes for _, nbytes in local))
        try:
            offsets = _packed(places)
            if op == "WRITE":
                for (address, nbytes), offset in zip(local, offsets, strict=True):
                    ctypes.memmove(buffer.address + offset, address, nbytes)
            self._transfer(op, places, buffer, offsets)
            if op == "READ":
                for (address, nbytes), offset in zip(local, offsets, strict=True):
                    ctypes.memmove(address, buffer.address + offset, nbytes)
        finally:
            self.give_back(buffer)

    def _transfer(self, op: str, places: Sequence[Location], buffer: RegisteredBuffer,
                  offsets: list[int]) -> None:
        assert offsets[-1] + places[-1][2] <= buffer.nbytes if places else True
        local = [(buffer.address + off, nbytes)
                 for off, (_, _, nbytes) in zip(offsets, places, strict=True)]
        with _as_os_error(op):
            try:
                self._post(op, local, places)
            except TransferTimeout as exc:
                buffer.is_retired = buffer.is_retired or not exc.is_cancelled
                raise

    def _post(self, op: str, local: Sequence[tuple[int, int]], places: Sequence[Location],
              device: Device = None) -> None:
        """(lock not held) Run one transfer between local (address, nbytes) ranges of
        `device`'s memory, registered, and the store's locations, to its end or the timeout."""
        if not places:
            return
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self._lock:
            if self._remote is None:
                raise OSError("the data plane is not connected")
            remote = [(self._arenas[arena_id].address + offset, nbytes, 0)
                      for arena_id, offset, nbytes in places]
            mem, dev = _mem_type(device)
            handle = self.agent.initialize_xfer(
                op, self.agent.get_xfer_descs([(address, nbytes, dev)
                                               for address, nbytes in local], mem),
                self.agent.get_xfer_descs(remote, "DRAM"), self._remote)
        wait_done(self.agent, handle, op, deadline, self._lock)

    def close(self) -> None:
        with self._lock, self._pool_lock:
            for buffer in self._all:
                if self._on_release_buffer is not None:
                    self._on_release_buffer(buffer.address, buffer.nbytes)
                self.agent.deregister_memory(buffer.registration)
            for *_, registration in self._regions:
                self.agent.deregister_memory(registration)
            self._all, self._free, self._regions = [], [], []
            if self._remote is not None:
                self.agent.remove_remote_agent(self._remote.decode())
                self._remote = None
            self.agent = None  # its UCX worker ends here, not at exit


def _packed(places: Sequence[Location]) -> list[int]:
    offsets, at = [], 0
    for _, _, nbytes in places:
        offsets.append(at)
        at += nbytes
    return offsets
