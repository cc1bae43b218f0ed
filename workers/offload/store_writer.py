"""Write-through of newly cached device pages to the remote store, off the engine thread.

`StoreWriter.write_through` (engine thread) takes one batched device -> host copy of the
pages and queues it; a thread of its own sends them, _WRITE_BATCH_NBYTES per call, so decode
steps never wait on the network. The host rows go to `put_pages_from` as they are: a same-host
store gets each payload copied once, straight into its slot, with no encoded copy made here.
Pages that would overflow the queue (_STORE_QUEUE_BYTES) or find no host-copy slot (the store
is slow or down) are dropped and counted, not waited for.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.workers.engine.outputs import KvEventData
from kvmesh.workers.offload.connector import DevicePages, PageStore

log = logging.getLogger(__name__)

_STORE_QUEUE_BYTES = 2 << 30
# per put_pages_from call (the client batches and pipelines inside one): large, so the store's
# check of one batch overlaps the copy of the next; bounded, so pages show up ("stored") early
_WRITE_BATCH_NBYTES = 128 << 20


@dataclass
class _PendingWrite:
    """Pages of one write_through call: host copies, still being copied until `event`."""

    ns: Namespace
    keys: list[bytes]
    token_ids: list[list[int]]
    rows: list[torch.Tensor]
    event: torch.cuda.Event | None
    slots: list[int] | None  # the host-copy slots to give back once the pages are encoded


class StoreWriter:
    """Sends to `store` host copies of device pages taken through `pool`; `emit(event)` reports
    the pages stored. Counts the pages it dropped (`num_dropped`) and the sends that failed
    (`num_errors`)."""

    def __init__(self, store: PageStore, pool: DevicePages,
                 emit: Callable[[KvEventData], None]) -> None:
        self.store = store
        self.pool = pool
        self._emit = emit
        self._lock = threading.Lock()
        self._queue: queue.Queue[_PendingWrite | None] = queue.Queue()
        self._queued_bytes = 0
        # write_through calls queued / done, in queue order (`mark`, `wait_for`)
        self._num_queued = self._num_done = 0
        self._done = threading.Condition(self._lock)
        self.num_dropped = 0
        self.num_errors = 0
        self._thread: threading.Thread | None = threading.Thread(
            target=self._write_loop, name="kv-store-writer", daemon=True)
        self._thread.start()

    def write_through(self, ns: Namespace, pages: list[tuple[bytes, list[int], int]]) -> None:
        """Queue copies of newly cached device pages, (key, token ids, page id) each, for the
        store: one batched device -> host copy and one queue entry, sent by the writer thread.
        Pages that would overflow the queue or find no host-copy slot (the store is slow or
        down) are dropped and counted rather than stall the caller."""
        if not pages:
            return
        with self._lock:  # only the writer thread changes it meanwhile, and only downwards
            room = max(0, (_STORE_QUEUE_BYTES - self._queued_bytes) // ns.page_nbytes)
        rows: list[torch.Tensor] = []
        slots: list[int] | None = None
        event: torch.cuda.Event | None = None
        if room:
            try:
                rows, slots, event = self.pool.copy_to_host([page_id for _, _, page_id in
                                                             pages[:room]])
            except Exception:  # e.g. a device error: the pages are not written, the step goes on
                log.warning("store write-through host copy failed", exc_info=True)
        self.num_dropped += len(pages) - len(rows)
        if rows:
            kept = pages[: len(rows)]
            with self._lock:
                self._queued_bytes += len(rows) * ns.page_nbytes
                self._num_queued += 1
            self._queue.put(_PendingWrite(ns, [key for key, _, _ in kept],
                                          [tokens for _, tokens, _ in kept], rows, event, slots))

    def _write_loop(self) -> None:
        """Send queued pages, _WRITE_BATCH_NBYTES per call, until a None arrives."""
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                if item.event is not None:
                    item.event.synchronize()
                per_call = max(1, _WRITE_BATCH_NBYTES // item.ns.page_nbytes)
                for start in range(0, len(item.keys), per_call):
                    self._send(item, range(start, min(start + per_call, len(item.keys))))
            except Exception as exc:  # the host copies failed: drop them, keep the thread
                self.num_errors += 1
                log.warning("store write of %d pages failed: %s", len(item.keys), exc)
            finally:
                if item.slots is not None:
                    self.pool.release_host_copies(item.slots)
                with self._lock:
                    self._queued_bytes -= len(item.keys) * item.ns.page_nbytes
                    self._num_done += 1
                    self._done.notify_all()
                self._queue.task_done()
            # the host copies go now (after the waiters were told), not at the next write: on
            # CPU they are fresh memory, whose freeing would delay the next write's start
            del item

    def _send(self, item: _PendingWrite, indices: range) -> None:
        try:
            pages = [(item.keys[i], tokens_to_bytes(item.token_ids[i]),
                      memoryview(item.rows[i].view(torch.uint8).numpy()))
                     for i in indices]
            self.store.put_pages_from(item.ns, pages)
            self._emit(KvEventData("stored", [key for key, _, _ in pages], None, "store"))
        except Exception as exc:  # a store that is down is a dropped write, not a crash
            self.num_errors += 1
            log.warning("store write of %d pages failed: %s", len(indices), exc)

    def mark(self) -> int:
        """A mark of the writes queued so far (any thread), for `wait_for`."""
        with self._lock:
            return self._num_queued

    def wait_for(self, mark: int, timeout: float) -> bool:
        """Block (any thread) until every write queued before `mark` was sent or failed; False
        if that took longer than `timeout` seconds."""
        with self._done:
            return self._done.wait_for(lambda: self._num_done >= mark, timeout)

    def flush(self) -> None:
        """Block until every queued store write has been sent or has failed."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Stop the thread once what was queued before is sent (waits up to 10 s)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
