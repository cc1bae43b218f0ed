"""Wire forms of the KVStore service: bulk data frames, NamespaceSpec <-> Namespace, tier enums.

Bulk payloads travel as `data` frames: a PutRequest / GetClosestResponse (or the page-level
messages) whose only field is `bytes data = 2`. On the wire such a message is exactly
`0x12, varint(len), raw bytes`, so both ends write and read it here without building protobuf
objects: the serializers below emit the tag and length by hand and the deserializers peek at the
tag byte and hand out a memoryview into the received bytes (no copy). Headers (field 1, tag 0x0a)
go through the generated pb2 classes. Any other gRPC client still sees ordinary messages.

A deserializer never raises (grpc would turn that into INTERNAL): bytes that are neither a
header nor a data frame become a `BadMessage`, which the receiver reports as INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from kvmesh.cachestore.errors import ProtocolError
from kvmesh.cachestore.keys import LAYOUT_VERSION, InvalidNamespace, Namespace
from kvmesh.cachestore.tiers.base import TierStats
from kvmesh.v1 import common_pb2, store_pb2

SERVICE = store_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name  # "kvmesh.v1.KVStore"
FRAME_NBYTES = 1 << 20  # bulk data is cut into frames of about this size
MAX_PAGE_IN_FRAME = 8 << 20  # pages up to this size travel whole in one frame
DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)
HEADER_TAG = 0x0A  # field 1, wire type 2
MAX_MESSAGE_NBYTES = 64 << 20  # raised limit, both ends: headers carry up to MAX_TOKENS tokens
MAX_TOKENS = 1 << 20
MAX_STRING_NBYTES = 1024  # any NamespaceSpec string field
MAX_PAGE_NBYTES = 1 << 30  # one page's payload

GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_NBYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_NBYTES),
]
# Client side: read server streams on the calling thread instead of a helper thread; on a
# 2-core machine this took GetClosest from ~1.5 to ~2.4 GB/s (benchmarks/store_bench.py).
CLIENT_OPTIONS: list[tuple[str, int]] = [
    *GRPC_OPTIONS,
    ("SingleThreadedUnaryStream", 1),  # grpc.experimental.ChannelOptions
]

TIER_BY_NAME: dict[str, Any] = {  # name -> common_pb2.Tier value
    "device": common_pb2.TIER_DEVICE,
    "cpu": common_pb2.TIER_CPU,
    "disk": common_pb2.TIER_DISK,
    "redis": common_pb2.TIER_REDIS,
    "remote": common_pb2.TIER_REMOTE,
}
TIER_NAME_BY_ENUM: dict[int, str] = {value: name for name, value in TIER_BY_NAME.items()}


@dataclass(frozen=True)
class BadMessage:
    """Received bytes that do not parse; `reason` says why (goes into the status details)."""

    reason: str


# A received stream item: a parsed header message, a data frame, or garbage.
Received = Any  # pb2 header message | memoryview | BadMessage


def is_host_port(address: str) -> bool:
    """Whether `address` reads HOST:PORT with a port in 1..65535 (a gRPC target of ours)."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) <= 65535)


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when the varint is truncated or longer than 10 bytes."""
    value = shift = 0
    end = min(len(buf), pos + 10)
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return None


def encode_frame(parts: memoryview | bytes | Sequence[memoryview | bytes]) -> bytes:
    """Wire bytes of one data frame holding `parts` back to back (one copy, by join)."""
    if isinstance(parts, (bytes, bytearray, memoryview)):
        parts = (parts,)
    nbytes = sum(memoryview(p).nbytes for p in parts)
    return b"".join((bytes((DATA_TAG,)), varint(nbytes), *parts))


def make_serializer(header_type: Any) -> Callable[[Any], bytes]:
    """Serializer of a `oneof {header = 1; bytes data = 2}` stream: pb2 messages (of the oneof's
    wrapper type, or the bare header type) are serialized by protobuf, everything else is taken
    as a data frame (bytes, memoryview, or a sequence of them sent as one frame)."""

    def serialize(item: Any) -> bytes:
        if isinstance(item, header_type):
            return bytes((HEADER_TAG,)) + varint(item.ByteSize()) + item.SerializeToString()
        if hasattr(item, "SerializeToString"):
            return item.SerializeToString()
        return encode_frame(item)

    return serialize


def make_deserializer(message_type: Any) -> Callable[[bytes], Received]:
    """Deserializer of a `oneof {header = 1; bytes data = 2}` stream: a data frame comes back as
    a memoryview of its raw bytes (zero copy), a header as the parsed header message, anything
    else as a BadMessage."""

    def deserialize(raw: bytes) -> Received:
        view = memoryview(raw)
        if len(view) and view[0] == DATA_TAG:
            parsed = _read_varint(view, 1)
            if parsed is not None and parsed[1] + parsed[0] == len(view):
                return view[parsed[1] :]
        # Slow path: a header, or a data frame some other encoder wrote differently.
        try:
            message = message_type.FromString(raw)
        except DecodeError as exc:
            return BadMessage(f"undecodable {message_type.__name__}: {exc}")
        kind = message.WhichOneof("kind")
        if kind == "header":
            return message.header
        if kind == "data":
            return memoryview(message.data)
        return BadMessage(f"{message_type.__name__} carries neither a header nor data")

    return deserialize


def make_parser(message_type: Any) -> Callable[[bytes], Any]:
    """Deserializer of a plain request: the parsed message, or a BadMessage for garbage."""

    def parse(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except DecodeError as exc:
            return BadMessage(f"undecodable {message_type.__name__}: {exc}")

    return parse


def cut_frames(pages: Sequence[memoryview | bytes], frame_nbytes: int = FRAME_NBYTES
               ) -> Iterator[list[memoryview]]:
    """Group the concatenation of `pages` into data frames of about `frame_nbytes` (at most
    a quarter more, so three SmolLM2 pages of 368,640 B share a frame), never
    splitting a page of up to MAX_PAGE_IN_FRAME bytes: a frame holds whole pages (one page if it
    is bigger than `frame_nbytes`), so the receiver can slice pages out of frames without a copy.
    Larger pages are cut into `frame_nbytes` pieces. Each frame is a list of memoryview slices
    (no copy until the serializer joins them)."""
    frame: list[memoryview] = []
    size = 0
    for page in pages:
        view = memoryview(page).cast("B")
        if frame and size + len(view) > frame_nbytes + frame_nbytes // 4:
            yield frame
            frame, size = [], 0
        if len(view) > MAX_PAGE_IN_FRAME:
            for start in range(0, len(view), frame_nbytes):
                yield [view[start : start + frame_nbytes]]
            continue
        frame.append(view)
        size += len(view)
    if frame:
        yield frame


def receive_frames(stream: Iterator, nbytes: int, rpc: str) -> list[memoryview]:
    """The data frames of `stream`, which must add up to exactly `nbytes`."""
    frames: list[memoryview] = []
    filled = 0
    for frame in stream:
        if not isinstance(frame, memoryview):
            raise ProtocolError(f"{rpc}: expected a data frame, got {frame!r}")
        filled += len(frame)
        if filled > nbytes:
            raise ProtocolError(f"{rpc}: more data than the header announced")
        frames.append(frame)
    if filled != nbytes:
        raise ProtocolError(f"{rpc}: {filled} data bytes, the header announced {nbytes}")
    return frames


def split_pages(frames: Sequence[memoryview], sizes: Sequence[int]) -> list[memoryview]:
    """Cut received frames (whose lengths add up to sum(sizes)) into pages of `sizes` bytes. A
    page inside one frame is a view of it (no copy); only a page spread over several frames is
    copied, into its own buffer."""
    pages: list[memoryview] = []
    index, offset = 0, 0  # current frame, position in it
    for size in sizes:
        while index < len(frames) and offset == len(frames[index]):
            index, offset = index + 1, 0
        if offset + size <= len(frames[index]):
            pages.append(frames[index][offset : offset + size])
            offset += size
            continue
        page = memoryview(bytearray(size))
        filled = 0
        while filled < size:
            if offset == len(frames[index]):
                index, offset = index + 1, 0
            take = min(size - filled, len(frames[index]) - offset)
            page[filled : filled + take] = frames[index][offset : offset + take]
            filled, offset = filled + take, offset + take
        pages.append(page)
    return pages


def namespace_to_spec(ns: Namespace) -> common_pb2.NamespaceSpec:
    return common_pb2.NamespaceSpec(
        model=ns.model,
        weights_fingerprint=ns.weights_fingerprint,
        tokenizer_fingerprint=ns.tokenizer_fingerprint,
        kv_dtype=ns.dtype_name,
        layout_version=ns.layout_version,
        num_layers=ns.num_layers,
        num_kv_heads=ns.num_kv_heads,
        head_dim=ns.head_dim,
        page_size=ns.page_size,
        tp_rank=ns.tp_rank,
        tp_size=ns.tp_size,
        lora_id=ns.lora_id,
        salt=ns.salt,
    )


_SPEC_FIELDS = ("model", "weights_fingerprint", "tokenizer_fingerprint", "kv_dtype",
                "layout_version", "num_layers", "num_kv_heads", "head_dim", "page_size", "tp_rank",
                "tp_size", "lora_id", "salt")


def namespace_from_spec(spec: common_pb2.NamespaceSpec) -> Namespace:
    """Namespace of a request. Raises InvalidNamespace (a ValueError) for missing, oversized or
    out-of-range fields. proto3 cannot tell 0 from unset, so tp_size 0 reads as 1 and
    layout_version 0 as the current version; any other version is refused. Checked namespaces
    are cached (their digest is computed once)."""
    return _namespace(tuple(getattr(spec, name) for name in _SPEC_FIELDS))


@functools.lru_cache(maxsize=4096)
def _namespace(values: tuple) -> Namespace:
    fields = dict(zip(_SPEC_FIELDS, values, strict=True))
    for name, value in fields.items():
        if isinstance(value, str) and len(value.encode("utf-8")) > MAX_STRING_NBYTES:
            raise InvalidNamespace(f"namespace {name} is {len(value.encode('utf-8'))} bytes, "
                                   f"at most {MAX_STRING_NBYTES}")
    fields["layout_version"] = fields["layout_version"] or LAYOUT_VERSION
    if fields["layout_version"] != LAYOUT_VERSION:
        raise InvalidNamespace(f"namespace layout_version {fields['layout_version']} "
                               f"unsupported; this store speaks {LAYOUT_VERSION}")
    if not fields["kv_dtype"]:
        raise InvalidNamespace("namespace kv_dtype must be set, e.g. 'bfloat16'")
    fields["tp_size"] = fields["tp_size"] or 1
    fields["dtype"] = fields.pop("kv_dtype")
    ns = Namespace(**fields)
    if ns.page_nbytes > MAX_PAGE_NBYTES:
        raise InvalidNamespace(f"namespace describes pages of {ns.page_nbytes} bytes, at most "
                               f"{MAX_PAGE_NBYTES}")
    ns.digest  # noqa: B018 - computed once, here, for every later request
    return ns


def tier_enum(name: str) -> Any:  # a common_pb2.Tier value
    return TIER_BY_NAME.get(name, common_pb2.TIER_UNSPECIFIED)


def tier_name(value: int) -> str:
    return TIER_NAME_BY_ENUM.get(value, "unspecified")


def stats_to_proto(stats: TierStats) -> store_pb2.TierStats:
    return store_pb2.TierStats(
        name=stats.name, tier=tier_enum(stats.name), used_bytes=stats.used_bytes,
        capacity_bytes=stats.capacity_bytes, num_pages=stats.num_pages, hits=stats.hits,
        misses=stats.misses, evictions=stats.evictions, errors=stats.errors,
        is_available=stats.is_available)


def stats_from_proto(message: store_pb2.TierStats) -> TierStats:
    return TierStats(
        name=message.name, used_bytes=message.used_bytes, capacity_bytes=message.capacity_bytes,
        num_pages=message.num_pages, hits=message.hits, misses=message.misses,
        evictions=message.evictions, errors=message.errors, is_available=message.is_available)
