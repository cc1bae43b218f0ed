"""Page codec over many pages at once: headers of pages at one stride compared together, and
`decode_page` over a batch on the bulk pool. The page layout is codec.py's."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from kvmesh.cachestore.bulk_pool import map_chunked
from kvmesh.cachestore.codec import (
    CHECKSUM_AT,
    DIGEST_AT,
    HEADER_FIXED_NBYTES,
    KEY_AT,
    decode_page,
    header_template,
)
from kvmesh.cachestore.errors import PageCorrupt
from kvmesh.cachestore.keys import Namespace


def check_page_headers_at(address: int, pitch: int, count: int, ns: Namespace,
                          keys: Sequence[bytes], token_ids: bytes) -> list[int]:
    """`check_page_header` for `count` encoded pages of `ns` that lie `pitch` bytes apart from
    `address` (consecutive slots of one arena, say), every field compared for all of them at
    once: the checksums their headers record, for the leading pages whose headers are byte for
    byte what `keys` and `token_ids` (the pages' token bytes back to back) predict. The first
    page that differs ends the list. The memory must stay valid for the call."""
    expected, _ = header_template(ns)
    tokens_end = HEADER_FIXED_NBYTES + 4 * ns.page_size
    if count <= 0:
        return []
    if pitch < tokens_end or len(keys) != count or len(token_ids) != count * 4 * ns.page_size:
        raise ValueError("pages overlap, or keys / token ids do not match the count")
    raw = (ctypes.c_uint8 * (pitch * (count - 1) + tokens_end)).from_address(address)
    headers = np.lib.stride_tricks.as_strided(np.ctypeslib.as_array(raw),
                                              shape=(count, tokens_end), strides=(pitch, 1))
    template = np.frombuffer(expected, dtype=np.uint8)
    ok = (headers[:, :KEY_AT] == template[:KEY_AT]).all(axis=1)
    ok &= (headers[:, KEY_AT:DIGEST_AT]
           == np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(count, -1)).all(axis=1)
    ok &= (headers[:, DIGEST_AT:CHECKSUM_AT] == template[DIGEST_AT:CHECKSUM_AT]).all(axis=1)
    ok &= (headers[:, HEADER_FIXED_NBYTES:tokens_end]
           == np.frombuffer(token_ids, dtype=np.uint8).reshape(count, -1)).all(axis=1)
    num_ok = count if ok.all() else int(np.argmin(ok))
    checksums = np.ascontiguousarray(headers[:num_ok, CHECKSUM_AT:HEADER_FIXED_NBYTES])
    return checksums.view("<u8").ravel().tolist()

def decode_pages(
    blobs: Sequence[bytes | memoryview],
    ns: Namespace,
    keys: Sequence[bytes],
    token_ids: Sequence[bytes],
) -> list[memoryview | None]:
    """`decode_page` over many pages: each page's payload, or None where it fails verification.
    Large batches are verified in contiguous chunks on a shared thread pool."""

    def verify(indices: range) -> list[memoryview | None]:
        out: list[memoryview | None] = []
        for i in indices:
            try:
                out.append(decode_page(blobs[i], ns, keys[i], token_ids[i]))
            except PageCorrupt:
                out.append(None)
        return out

    return map_chunked(verify, len(blobs), len(blobs) * ns.page_nbytes)
