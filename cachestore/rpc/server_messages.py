"""Server-side checks and assembly of KVStore messages: everything a servicer method needs besides
the store call. Every check raises InvalidRequest / InvalidNamespace with a message that says
what was wrong; nothing is stored until a whole request has been received and checked."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.keys import Namespace, tokens_from_bytes
from kvmesh.cachestore.rpc import wire
from kvmesh.cachestore.store.tiered import ClosestPages
from kvmesh.v1 import store_pb2

MAX_PAYLOAD_NBYTES = 8 << 30  # one Put's page data
MAX_KEYS = 1 << 16  # keys in one page-level call
MAX_PAGE_NBYTES = 1 << 30  # one encoded page


def check_token_bytes(data: bytes) -> np.ndarray:
    """Token ids of a request: little-endian int32, non-empty, at most MAX_TOKENS."""
    if not data:
        raise InvalidRequest("token_ids is empty: send at least one token")
    if len(data) % 4:
        raise InvalidRequest(f"token_ids is {len(data)} bytes, not a multiple of 4 "
                             "(little-endian int32 per token)")
    if len(data) // 4 > wire.MAX_TOKENS:
        raise InvalidRequest(f"{len(data) // 4} tokens, at most {wire.MAX_TOKENS} per request")
    return tokens_from_bytes(data)


def parse_tokens_request(request: Any) -> tuple[Namespace, np.ndarray]:
    """(namespace, token ids) of a GetClosest / Lookup / Delete request."""
    return wire.namespace_from_spec(request.namespace), check_token_bytes(request.token_ids)


def _receive_frames(items: Iterator, sizes: Sequence[int], rpc: str) -> list[memoryview]:
    """Read the data frames after the header and cut them into pages of `sizes` bytes; the
    frames must add up to exactly sum(sizes)."""
    nbytes = sum(sizes)
    frames: list[memoryview] = []
    filled = 0
    for item in items:
        if isinstance(item, wire.BadMessage):
            raise InvalidRequest(f"{rpc}: bad message after {filled} data bytes: {item.reason}")
        if not isinstance(item, memoryview):
            raise InvalidRequest(f"{rpc}: a second header after {filled} data bytes")
        filled += len(item)
        if filled > nbytes:
            raise InvalidRequest(f"{rpc}: data frames carry more than the {nbytes} bytes "
                                 "the header announced")
        frames.append(item)
    if filled != nbytes:
        raise InvalidRequest(f"{rpc}: data frames add up to {filled} bytes, the header "
                             f"announced {nbytes}")
    return wire.split_pages(frames, sizes)


def _first_header(items: Iterator, header_type: type, rpc: str) -> Any:
    first = next(items, None)
    if first is None:
        raise InvalidRequest(f"{rpc}: empty stream; send a header first")
    if isinstance(first, wire.BadMessage):
        raise InvalidRequest(f"{rpc}: bad first message: {first.reason}")
    if not isinstance(first, header_type):
        raise InvalidRequest(f"{rpc}: the stream must start with a header, got a data frame")
    return first


def receive_put(items: Iterator) -> tuple[Namespace, np.ndarray, list[memoryview]]:
    """(namespace, token ids, one payload view per full page) of a whole Put stream."""
    header = _first_header(items, store_pb2.PutHeader, "Put")
    ns = wire.namespace_from_spec(header.namespace)
    token_ids = check_token_bytes(header.token_ids)
    num_pages = len(token_ids) // ns.page_size
    expected = num_pages * ns.page_nbytes
    if header.payload_nbytes != expected:
        raise InvalidRequest(
            f"Put: payload_nbytes is {header.payload_nbytes}, but {len(token_ids)} tokens make "
            f"{num_pages} full pages of {ns.page_nbytes} bytes ({ns.page_shape} "
            f"{ns.dtype_name}) = {expected}")
    if expected > MAX_PAYLOAD_NBYTES:
        raise InvalidRequest(f"Put: {expected} payload bytes, at most {MAX_PAYLOAD_NBYTES} "
                             "per request; split the sequence")
    return ns, token_ids, _receive_frames(items, [ns.page_nbytes] * num_pages, "Put")


def closest_reply(ns: Namespace, closest: ClosestPages | None) -> Iterator:
    """GetClosest stream: header, then the pages' payloads cut into data frames."""
    if closest is None:
        yield store_pb2.GetClosestHeader(page_nbytes=ns.page_nbytes)
        return
    yield store_pb2.GetClosestHeader(
        num_tokens=closest.num_tokens, num_pages=len(closest.payloads),
        page_nbytes=ns.page_nbytes, tiers=[wire.tier_enum(t) for t in closest.tiers])
    yield from wire.cut_frames(closest.payloads)


def page_keys(request: store_pb2.PageKeys) -> list[bytes]:
    keys = list(request.keys)
    if len(keys) > MAX_KEYS:
        raise InvalidRequest(f"{len(keys)} page keys, at most {MAX_KEYS} per call")
    return keys


def pages_reply(blobs: Sequence[bytes | memoryview | None]) -> Iterator:
    """GetPages stream: header (found flags, sizes), then the found pages in data frames."""
    found = [memoryview(b).cast("B") for b in blobs if b is not None]
    yield store_pb2.GetPagesHeader(is_found=[b is not None for b in blobs],
                                   page_nbytes=[len(b) for b in found])
    yield from wire.cut_frames(found)


def receive_pages(items: Iterator) -> list[tuple[bytes, memoryview]]:
    """(key, encoded page view) pairs of a whole PutPages stream."""
    header = _first_header(items, store_pb2.PutPagesHeader, "PutPages")
    keys, sizes = list(header.keys), list(header.page_nbytes)
    if len(keys) != len(sizes):
        raise InvalidRequest(f"PutPages: {len(keys)} keys but {len(sizes)} page sizes")
    if len(keys) > MAX_KEYS:
        raise InvalidRequest(f"PutPages: {len(keys)} pages, at most {MAX_KEYS} per call")
    if any(size > MAX_PAGE_NBYTES for size in sizes):
        raise InvalidRequest(f"PutPages: a page is larger than {MAX_PAGE_NBYTES} bytes")
    total = sum(sizes)
    if total > MAX_PAYLOAD_NBYTES:
        raise InvalidRequest(f"PutPages: {total} bytes, at most {MAX_PAYLOAD_NBYTES} per call")
    if any(size == 0 for size in sizes):
        raise InvalidRequest("PutPages: a page of 0 bytes")
    return list(zip(keys, _receive_frames(items, sizes, "PutPages"), strict=True))
