"""Host tier / store pages -> pages of the device KV pool, fast.

A prefix hit from the host tier or the store is hundreds of pages (an 8K-token Llama-3-8B prefix
is 1 GB). Two steps:

- `stage_pages` (on admission): each encoded page's header is checked (key, namespace, shape,
  token ids), its payload copied into one pinned host tensor, and the checksum computed over
  that copy, so the source is read once and what is verified is exactly what will be uploaded.
  Pages are spread over a thread pool (ctypes.memmove and xxh3 release the GIL).
- `upload_pages` (in the step that uses them): one asynchronous host-to-device copy per run of
  consecutive page ids, straight from the pinned rows into the pool. PyTorch's pinned-memory
  allocator keeps the rows alive until those copies finish.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import torch
import xxhash

from cachestore.codec import PageCorrupt, check_page_header, map_chunked
from cachestore.keys import Namespace


def stage_pages(blobs: Sequence[bytes | memoryview], ns: Namespace, keys: Sequence[bytes],
                token_ids: Sequence[bytes], page_shape: tuple[int, ...], dtype: torch.dtype,
                pin: bool) -> torch.Tensor:
    """Verified payloads of the leading pages that pass every check, as rows of one host
    tensor [num_ok, *page_shape] (pinned when `pin`); a page that fails ends the prefix.
    Nothing references `blobs` afterwards."""
    n = len(blobs)
    host = torch.empty((n, *page_shape), dtype=dtype, pin_memory=pin)
    if n == 0:
        return host
    base = host.data_ptr()
    row = host[0].numel() * host.element_size()
    # the whole tensor as bytes, for hashing each copied row
    host_bytes = memoryview(host.view(-1).view(torch.uint8).numpy())

    def stage(indices: range) -> list[bool]:
        ok = []
        for i in indices:
            try:
                payload, checksum = check_page_header(blobs[i], ns, keys[i], token_ids[i])
                if payload.nbytes != row:
                    raise PageCorrupt("payload size differs from the pool's page size")
                src = np.frombuffer(payload, dtype=np.uint8)
                ctypes.memmove(base + i * row, src.ctypes.data, row)
                dst = host_bytes[i * row : (i + 1) * row]
                ok.append(xxhash.xxh3_64_intdigest(dst) == checksum)
            except PageCorrupt:
                ok.append(False)
        return ok

    results = map_chunked(stage, n, n * row)
    num_ok = results.index(False) if False in results else n
    return host[:num_ok]


def upload_pages(kv_pool: torch.Tensor, page_ids: Sequence[int],
                 rows: Sequence[torch.Tensor]) -> None:
    """kv_pool[page_ids[i]] = rows[i] (host tensors of one page each); runs of consecutive page
    ids whose rows are consecutive in one staged tensor go as one copy. Asynchronous on CUDA
    (non_blocking from pinned rows)."""
    i = 0
    while i < len(page_ids):
        j = i + 1
        while (j < len(page_ids) and page_ids[j] == page_ids[j - 1] + 1
               and _follows(rows[j - 1], rows[j])):
            j += 1
        src = rows[i] if j == i + 1 else _span(rows[i], j - i)
        dst = kv_pool[page_ids[i]] if j == i + 1 else kv_pool[page_ids[i] : page_ids[j - 1] + 1]
        dst.copy_(src, non_blocking=True)
        i = j


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b is the row right after a in the same contiguous storage."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size())


def _span(first: torch.Tensor, count: int) -> torch.Tensor:
    """`count` consecutive rows starting at `first`, as one [count, *row shape] view."""
    return first.as_strided((count, *first.shape), (first.numel(), *first.stride()))
