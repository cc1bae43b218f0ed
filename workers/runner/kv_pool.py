"""The device KV pool and every page move in or out of it.

Pool: [num_pages + 1, num_layers, 2, page_size, num_kv_heads, head_dim] in the model dtype.
The last page is a scratch page that padded rows of a captured decode batch write into; the
block manager never hands it out.

- in: staged rows of a prefix load (`move_in`), whole or, for rows still arriving, one layer
  run at a time (`LayerRunLoads`, waited for just before the layers that read them);
- within: copy-on-write copies of a shared partial page;
- out: one page's payload (`read_page`, demotion to the host tier), and batched device -> host
  copies for the store write-through (`copy_to_host`, into `HostCopySlots`).
"""

from __future__ import annotations

import torch

from kvmesh.workers.runner.pool_copies import (
    ArrivingRows,
    HostCopySlots,
    StagedRow,
    arriving_loads,
    runs,
    upload_layers,
    upload_pages,
)


class LayerRunLoads:
    """Loads whose rows still arrive a layer run at a time: `wait(k)` queues, on the current
    stream, moving layer run k of their rows into the pool once it is in. Call it for every k,
    in order, before the work that reads those layers."""

    def __init__(self, kv_pool: torch.Tensor, targets: list[tuple[ArrivingRows, torch.Tensor]]
                 ) -> None:
        self.kv_pool = kv_pool
        self.targets = targets  # (rows arriving, int64 pool page ids of its rows on the device)

    def wait(self, run: int) -> None:
        for source, page_ids in self.targets:
            upload_layers(self.kv_pool, page_ids, source, run)


class PoolPages:
    """Owns the KV pool tensor (`kv_pool`) and the pinned host-copy slots. Engine thread,
    except `copy_to_host`'s slots, which the store writer thread gives back."""

    def __init__(self, num_pages: int, page_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_pages = num_pages
        self.page_shape, self.dtype, self.device = page_shape, dtype, device
        self.page_nbytes = dtype.itemsize
        for dim in page_shape:
            self.page_nbytes *= dim
        self.scratch_page = num_pages
        self.kv_pool = torch.zeros((num_pages + 1, *page_shape), dtype=dtype, device=device)
        # pinned rows for the store write-through's host copies (set on CUDA by the engine)
        self.host_slots: HostCopySlots | None = None

    # ------------------------------------------------------------------ in
    def move_in(self, copies: list[tuple[int, int]], loads: list[tuple[int, StagedRow]],
                layer_runs: list[range] | None = None) -> LayerRunLoads | None:
        """Queue the batch's page moves: copy-on-write copies (src, dst) first (a copy's
        source may have been freed and reused as a load target), then loaded rows into their
        pages. With `layer_runs`, rows still arriving in exactly those runs are left to the
        returned LayerRunLoads (None when there are none); every other row goes now,
        asynchronously on CUDA (rows still arriving are waited for whole)."""
        for src, dst in copies:
            self.kv_pool[dst].copy_(self.kv_pool[src])
        arriving = arriving_loads(loads, layer_runs) if layer_runs else []
        if not arriving:
            self.write_pages(loads)
            return None
        self.write_pages([load for load in loads if not isinstance(load[1][0], ArrivingRows)])
        return LayerRunLoads(self.kv_pool, [(source, self.device_index(ids))
                                            for source, ids in arriving])

    def write_pages(self, loads: list[tuple[int, StagedRow]]) -> None:
        """Staged pages (rows of kv_upload.PageStager tensors, or of ArrivingRows: waited for
        whole) into pool pages; asynchronous on CUDA."""
        upload_pages(self.kv_pool, [page_id for page_id, _ in loads], [row for _, row in loads])

    def device_index(self, rows: list[int]) -> torch.Tensor:
        """An int64 index on the device, copied from page-locked memory without waiting for the
        step queued before it (a list index, or a blocking copy, would wait for the whole
        step: the CPU then could not do its bookkeeping meanwhile)."""
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        return index.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ out
    def read_page(self, page_id: int) -> memoryview:
        """A host copy of one page's payload ([num_layers, 2, page_size, kv_heads, head_dim])."""
        page = self.kv_pool[page_id].to("cpu", copy=True).contiguous()
        return memoryview(page.view(torch.uint8).numpy()).cast("B")

    def copy_to_host(self, page_ids: list[int]
                     ) -> tuple[list[torch.Tensor], list[int] | None, torch.cuda.Event | None]:
        """Start copying pages to host memory without waiting: (one host row per page, the
        `host_slots` holding them, to give back once read, and an event that completes with
        the copies, None on CPU). Rows go into the slots (pinned on CUDA), one copy per run of
        consecutive pages and slots; fewer rows than pages when the slots run out. Without
        slots (the CPU default) the copies are plain and done on return."""
        if self.host_slots is None:
            return list(self.kv_pool[page_ids].cpu().unbind()), None, None
        slots = self.host_slots.take(len(page_ids))
        rows = self.host_slots.rows
        if not slots or rows is None:  # none free, or the arena could not be allocated
            return [], [], None
        for run in runs(len(slots), lambda i: page_ids[i] == page_ids[i - 1] + 1
                        and slots[i] == slots[i - 1] + 1):
            page, slot = page_ids[run.start], slots[run.start]
            rows[slot : slot + len(run)].copy_(self.kv_pool[page : page + len(run)],
                                               non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return [rows[slot] for slot in slots], slots, event

    def enable_host_copies(self, max_nbytes: int) -> None:
        """Pinned slots for the write-through's host copies (CUDA only; CPU copies are plain),
        at most the pool's size, pinned on a background thread."""
        if self.device.type == "cuda" and self.host_slots is None:
            nbytes = min(max_nbytes, self.num_pages * self.page_nbytes)
            self.host_slots = HostCopySlots(self.page_shape, self.dtype, nbytes)
            self.host_slots.start()

    def release_host_copies(self, slots: list[int]) -> None:
        """Give back the slots of a `copy_to_host` once its rows are read (any thread)."""
        if self.host_slots is not None:
            self.host_slots.give_back(slots)
