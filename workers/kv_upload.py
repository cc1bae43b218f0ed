"""Host page payloads -> pages of the device KV pool, fast.

A prefix hit from the host tier or the store is hundreds of pages (an 8K-token Llama-3-8B prefix
is 1 GB). Copying them one by one from pageable memory runs at a few GB/s. Here they go in
chunks: copied into a pinned staging buffer by a thread pool (ctypes.memmove releases the GIL),
sent in one host-to-device copy per chunk, and scattered into their pool slots on the device.
Two staging buffers alternate, so the host fills one while the other is in flight.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_CHUNK_BYTES = 64 << 20
_COPY_THREADS = min(8, os.cpu_count() or 1)


class PageUploader:
    """Owns two staging buffers of up to _CHUNK_BYTES each (pinned on CUDA), allocated on first
    use, and a device buffer of the same size per staging buffer. Called from one thread."""

    def __init__(self, kv_pool: torch.Tensor) -> None:
        self.kv_pool = kv_pool
        self.page_shape = tuple(kv_pool.shape[1:])
        self.page_nbytes = kv_pool[0].numel() * kv_pool.element_size()
        self.pages_per_chunk = max(1, _CHUNK_BYTES // self.page_nbytes)
        self.is_cuda = kv_pool.device.type == "cuda"
        self._staging: list[torch.Tensor] = []
        self._device: list[torch.Tensor] = []
        self._free: list[torch.cuda.Event | None] = [None, None]
        self._threads = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="kvmesh-upload")

    def upload(self, page_ids: Sequence[int], payloads: Sequence[memoryview | bytes]) -> None:
        """Copy payloads[i] (page_nbytes bytes each) into kv_pool[page_ids[i]]. Asynchronous on
        CUDA: the pool writes are queued on the current stream; the payloads may be dropped as
        soon as this returns."""
        assert len(page_ids) == len(payloads)
        if not page_ids:
            return
        if not self._staging:
            self._allocate()
        step = self.pages_per_chunk
        for c, start in enumerate(range(0, len(page_ids), step)):
            buf = c % 2
            event = self._free[buf]
            if event is not None:
                event.synchronize()  # the staging buffer's last copy has left it
            staging = self._staging[buf]
            chunk = payloads[start : start + step]
            self._fill(staging, chunk)
            n = len(chunk)
            dev = self._device[buf][:n]
            dev.copy_(staging[:n], non_blocking=True)
            ids = torch.tensor(page_ids[start : start + step], dtype=torch.int64)
            self.kv_pool.index_copy_(0, ids.to(self.kv_pool.device, non_blocking=True), dev)
            if self.is_cuda:
                self._free[buf] = torch.cuda.Event()
                self._free[buf].record()

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    def _allocate(self) -> None:
        shape = (self.pages_per_chunk, *self.page_shape)
        dtype = self.kv_pool.dtype
        for _ in range(2):
            self._staging.append(torch.empty(shape, dtype=dtype, pin_memory=self.is_cuda))
            self._device.append(torch.empty(shape, dtype=dtype, device=self.kv_pool.device)
                                if self.is_cuda else self._staging[-1])

    def _fill(self, staging: torch.Tensor, payloads: Sequence[memoryview | bytes]) -> None:
        """payloads -> staging[:len(payloads)], one memmove per page on the thread pool."""
        base = staging.data_ptr()
        nbytes = self.page_nbytes
        sources = []
        for payload in payloads:
            src = np.frombuffer(payload, dtype=np.uint8)
            if src.nbytes != nbytes:
                raise ValueError(f"page payload is {src.nbytes} bytes, expected {nbytes}")
            sources.append(src)

        def copy(i: int) -> None:
            ctypes.memmove(base + i * nbytes, sources[i].ctypes.data, nbytes)

        if len(sources) < 4:
            for i in range(len(sources)):
                copy(i)
        else:
            list(self._threads.map(copy, range(len(sources))))
