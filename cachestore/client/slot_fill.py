"""Filling reserved slots of a same-host store's shared arenas (cachestore/client/shm_puts.py):
what goes into each slot is an encoded page, written there by one of two fillers.

- `EncodedPages`: pages already encoded by the caller, copied as they are;
- `PayloadPages`: (key, token ids, payload) triples encoded in place: the payload is copied
  from the caller's buffer into the slot once and hashed there (xxh3 of the bytes the store
  will check), then the header is written in front of it. No encoded copy is ever made.

Both copy (and hash) on the bulk pool with the GIL released. The store checks every page
(header, key, checksum) at CommitPages whichever filler wrote it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from kvmesh.cachestore.bulk_pool import map_chunked
from kvmesh.cachestore.codec import checksum_at, encode_header, payload_offset
from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.keys import KEY_NBYTES, Namespace
from kvmesh.cachestore.shm.segments import buffer_address, copy_many

PayloadPage = tuple[bytes, bytes, memoryview]  # (key, token ids as little-endian int32, payload)


def check_payload_pages(ns: Namespace, pages: Sequence[PayloadPage]) -> None:
    """Raises InvalidRequest unless every page is a key, token ids and a contiguous payload
    of the sizes `ns` gives."""
    for key, token_ids, payload in pages:
        if (len(key) != KEY_NBYTES or len(token_ids) != 4 * ns.page_size
                or payload.nbytes != ns.page_nbytes or not payload.c_contiguous):
            raise InvalidRequest(
                f"a page of {ns.model!r} is a {KEY_NBYTES}-byte key, {ns.page_size} int32 "
                f"token ids and {ns.page_nbytes} contiguous payload bytes; got {len(key)}, "
                f"{len(token_ids) // 4} and {payload.nbytes}")


class EncodedPages:
    """Encoded pages of one size, (key, page) each, copied into slots as they are."""

    def __init__(self, pages: Sequence[tuple[bytes, memoryview]]) -> None:
        self.pages = pages
        self.keys = [key for key, _ in pages]
        self.nbytes = pages[0][1].nbytes

    def fill(self, start: int, addresses: Sequence[int]) -> None:
        """Copy pages[start + i] to addresses[i] (slots of `nbytes` the caller keeps mapped)."""
        copy_many([(address, buffer_address(view)[0], self.nbytes) for address, (_, view)
                   in zip(addresses, self.pages[start:], strict=False)])


class PayloadPages:
    """Pages of `ns` given as payloads, encoded in place into slots of `nbytes` (header +
    payload). Checked on construction: InvalidRequest for a key, token ids or payload of the
    wrong size. The caller keeps the payloads unchanged while they are copied."""

    def __init__(self, ns: Namespace, pages: Sequence[PayloadPage]) -> None:
        check_payload_pages(ns, pages)  # (a payload larger than its slot would overrun it)
        self.ns, self.pages = ns, pages
        self.keys = [key for key, _, _ in pages]
        self.payload_at = payload_offset(ns)
        self.nbytes = self.payload_at + ns.page_nbytes

    def fill(self, start: int, addresses: Sequence[int]) -> None:
        """Encode pages[start + i] at addresses[i] (slots the caller keeps mapped): payload
        copied and hashed on the bulk pool, then the header written before it."""
        pages = self.pages[start : start + len(addresses)]
        sources = [buffer_address(payload) for _, _, payload in pages]  # (address, keep-alive)
        at, size = self.payload_at, self.ns.page_nbytes

        def copy_and_hash(indices: range) -> list[int]:
            sums = []
            for i in indices:
                ctypes.memmove(addresses[i] + at, sources[i][0], size)
                sums.append(checksum_at(addresses[i] + at, size))
            return sums

        sums = map_chunked(copy_and_hash, len(pages), len(pages) * size)
        for address, (key, token_ids, _), payload_sum in zip(addresses, pages, sums, strict=True):
            header = encode_header(self.ns, key, token_ids, payload_sum)
            ctypes.memmove(address, header, len(header))
