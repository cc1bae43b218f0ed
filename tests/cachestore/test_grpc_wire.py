"""cachestore.wire: hand-written data frames are byte-identical to protobuf's, parse back without
copies, and pages survive any cut into frames."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc import wire
from kvmesh.v1 import store_pb2


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 1 << 20, (1 << 63) + 5])
def test_varint_matches_protobuf(value):
    # a message whose only field is uint64 payload_nbytes = 3: tag 0x18, then the varint
    expected = store_pb2.PutHeader(payload_nbytes=value).SerializeToString()
    assert (b"\x18" + wire.varint(value) == expected) or value == 0


@pytest.mark.parametrize("nbytes", [1, 127, 128, 368_640, 2 << 20])
def test_data_frame_is_protobufs_encoding(nbytes):
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    frame = wire.encode_frame([memoryview(data)[:7], memoryview(data)[7:]])
    assert frame == store_pb2.PutRequest(data=data).SerializeToString()
    assert frame == store_pb2.GetClosestResponse(data=data).SerializeToString()
    parsed = wire.make_deserializer(store_pb2.PutRequest)(frame)
    assert isinstance(parsed, memoryview) and parsed.obj is frame  # a view, no copy
    assert parsed == data


def test_header_serializer_and_deserializer():
    header = store_pb2.GetClosestHeader(num_tokens=32, num_pages=2, page_nbytes=512, tiers=[2, 3])
    raw = wire.make_serializer(store_pb2.GetClosestHeader)(header)
    assert raw == store_pb2.GetClosestResponse(header=header).SerializeToString()
    assert wire.make_deserializer(store_pb2.GetClosestResponse)(raw) == header
    empty = store_pb2.GetClosestHeader()
    raw = wire.make_serializer(store_pb2.GetClosestHeader)(empty)
    assert wire.make_deserializer(store_pb2.GetClosestResponse)(raw) == empty


@pytest.mark.parametrize("raw, reason", [
    (b"", "carries neither a header nor data"),
    (b"\xff\xff\xff", "undecodable PutRequest"),
    (b"\x12\x05ab", "undecodable PutRequest"),  # length says 5, 2 bytes follow
    (b"\x0a\x02\x08", "undecodable PutRequest"),
])
def test_garbage_becomes_bad_message(raw, reason):
    parsed = wire.make_deserializer(store_pb2.PutRequest)(raw)
    assert isinstance(parsed, wire.BadMessage) and reason in parsed.reason


def test_cut_frames_keeps_pages_whole_up_to_the_limit():
    smol = [memoryview(bytes([i]) * 368_640) for i in range(7)]
    frames = list(wire.cut_frames(smol))
    assert [len(f) for f in frames] == [3, 3, 1]  # 1.1 MB frames, pages never split
    llama = [memoryview(bytes(2 << 20)) for _ in range(3)]
    assert [len(f) for f in wire.cut_frames(llama)] == [1, 1, 1]
    huge = [memoryview(bytes(9 << 20))]  # above MAX_PAGE_IN_FRAME: cut into 1 MiB pieces
    frames = list(wire.cut_frames(huge))
    assert len(frames) == 9 and all(len(f[0]) == 1 << 20 for f in frames)


@pytest.mark.parametrize("frame_sizes", [[768], [256, 512], [100, 300, 1, 367], [1] * 768])
def test_split_pages_any_cut(frame_sizes):
    data = np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tobytes()
    frames, start = [], 0
    for size in frame_sizes:
        frames.append(memoryview(data[start : start + size]))
        start += size
    pages = wire.split_pages(frames, [256, 256, 256])
    assert [bytes(p) for p in pages] == [data[:256], data[256:512], data[512:]]
    if frame_sizes == [256, 512]:  # pages inside one frame are views of it
        assert pages[1].obj is frames[1].obj and pages[2].obj is frames[1].obj


def test_namespace_spec_round_trip():
    ns = Namespace("m", 30, 3, 64, torch.bfloat16, page_size=16, salt="t", lora_id="l",
                   tp_rank=1, tp_size=2, weights_fingerprint="w", tokenizer_fingerprint="k")
    back = wire.namespace_from_spec(wire.namespace_to_spec(ns))
    # the server side carries the dtype by name (Namespace compares dtype as given)
    assert back == dataclasses.replace(ns, dtype="bfloat16") and back.digest == ns.digest
    spec = wire.namespace_to_spec(Namespace("m", 1, 1, 4, "float16"))
    spec.tp_size = 0
    spec.layout_version = 0
    assert wire.namespace_from_spec(spec) == Namespace("m", 1, 1, 4, "float16")
