"""Bad input over real gRPC: client-side checks (ValueError), and raw bytes sent through a plain
channel with identity serializers, which the server must answer with INVALID_ARGUMENT and a clear
message, storing nothing."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.rpc.server import serve_store
from kvmesh.cachestore.rpc.wire import encode_frame, namespace_to_spec
from kvmesh.v1 import common_pb2, store_pb2

NS = Namespace("m", num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float16, page_size=4)
IDENTITY = {"request_serializer": None, "response_deserializer": None}


@pytest.fixture(scope="module")
def server():
    srv = serve_store(StoreConfig(port=0, cpu_bytes=64 << 20))
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def client(server):
    with StoreClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def kv(num_tokens: int, dtype=torch.float16, layers: int = 2) -> torch.Tensor:
    return torch.zeros(layers, 2, num_tokens, 1, 4, dtype=dtype)


@pytest.mark.parametrize("bad_kv, message", [
    (kv(8, layers=3), r"kv shape \(3, 2, 8, 1, 4\) does not match .* = \(2, 2, 8, 1, 4\)"),
    (kv(7), r"kv shape \(2, 2, 7, 1, 4\) does not match"),
    (kv(8, dtype=torch.bfloat16), "kv dtype torch.bfloat16 differs from the namespace's float16"),
    (np.zeros((2, 2, 8, 1, 4), np.float16), "kv must be a torch.Tensor, got ndarray"),
])
def test_client_refuses_wrong_kv(client, bad_kv, message):
    with pytest.raises(InvalidRequest, match=message):
        client.put(list(range(8)), bad_kv, NS)


@pytest.mark.parametrize("tokens, message", [
    ([], "token ids must not be empty"),
    ([[1, 2], [3, 4]], r"token ids must be 1-D, got shape \(2, 2\)"),
    ([1.5, 2.0], "token ids must be integers, got float64"),
    ([1, 1 << 40], r"token ids must be in \[0, 2147483647\], got \[1, 1099511627776\]"),
    ([5, -1], r"token ids must be in \[0, 2147483647\], got \[-1, 5\]"),
    (torch.ones(4), "token ids must be integers, got a torch.float32 tensor"),
])
def test_client_refuses_bad_tokens(client, tokens, message):
    for call in (lambda: client.get_closest(tokens, NS), lambda: client.lookup(tokens, NS)):
        with pytest.raises(ValueError, match=message):
            call()


def test_client_refuses_a_non_namespace(client):
    with pytest.raises(InvalidRequest, match="namespace must be a cachestore.Namespace"):
        client.lookup([1, 2, 3, 4], {"model": "m"})


def _get_closest(channel, request: bytes) -> grpc.RpcError:
    call = channel.unary_stream("/kvmesh.v1.KVStore/GetClosest", **IDENTITY)
    with pytest.raises(grpc.RpcError) as info:
        list(call(request, timeout=10))
    return info.value


def _spec(**changes) -> common_pb2.NamespaceSpec:
    spec = namespace_to_spec(NS)
    for name, value in changes.items():
        setattr(spec, name, value)
    return spec


@pytest.mark.parametrize("spec, token_ids, message", [
    (_spec(), b"\x01\x00\x00\x00\x02\x00\x00", "token_ids is 7 bytes, not a multiple of 4"),
    (_spec(), b"", "token_ids is empty"),
    (_spec(), bytes(4 * ((1 << 20) + 1)), "1048577 tokens, at most 1048576 per request"),
    (_spec(model="x" * 1025), b"\0" * 16, "namespace model is 1025 bytes, at most 1024"),
    (_spec(salt="s" * 2000), b"\0" * 16, "namespace salt is 2000 bytes, at most 1024"),
    (_spec(model=""), b"\0" * 16, "namespace model must not be empty"),
    (_spec(num_layers=0), b"\0" * 16, "namespace num_layers must be a positive int, got 0"),
    (_spec(kv_dtype="int7"), b"\0" * 16, "unsupported KV dtype 'int7'"),
    (_spec(kv_dtype=""), b"\0" * 16, "namespace kv_dtype must be set"),
    (_spec(layout_version=9), b"\0" * 16, "layout_version 9 unsupported"),
    (_spec(tp_rank=3, tp_size=2), b"\0" * 16, r"tp_rank 3 not in \[0, 2\)"),
    (_spec(num_layers=1 << 20, head_dim=1 << 12), b"\0" * 16,
     "namespace describes pages of 68719476736 bytes, at most 1073741824"),
])
def test_bad_get_closest_requests(channel, spec, token_ids, message):
    request = store_pb2.GetClosestRequest(namespace=spec, token_ids=token_ids)
    error = _get_closest(channel, request.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, error.details()), error.details()


@pytest.mark.parametrize("method", ["GetClosest", "Lookup", "Delete", "HasPages", "GetPages"])
def test_garbage_request_bytes(channel, method):
    streaming = method in ("GetClosest", "GetPages")
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(f"/kvmesh.v1.KVStore/{method}", **IDENTITY)
    with pytest.raises(grpc.RpcError) as info:
        reply = call(b"\xff\xfe garbage \x00", timeout=10)
        if streaming:
            list(reply)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{method}: undecodable ")


def _put(channel, messages: list[bytes]) -> grpc.RpcError | bytes:
    call = channel.stream_unary("/kvmesh.v1.KVStore/Put", **IDENTITY)
    try:
        return call(iter(messages), timeout=10)
    except grpc.RpcError as exc:
        return exc


def _put_header(num_tokens: int = 8, payload_nbytes: int | None = None) -> bytes:
    tokens = np.arange(num_tokens, dtype="<i4").tobytes()
    nbytes = (num_tokens // 4) * NS.page_nbytes if payload_nbytes is None else payload_nbytes
    header = store_pb2.PutHeader(namespace=namespace_to_spec(NS), token_ids=tokens,
                                 payload_nbytes=nbytes)
    return store_pb2.PutRequest(header=header).SerializeToString()


PAGE = bytes(NS.page_nbytes)  # 2 x 2 x 4 x 1 x 4 x fp16 = 128 bytes


@pytest.mark.parametrize("messages, message", [
    ([], "Put: empty stream; send a header first"),
    ([encode_frame(PAGE)], "Put: the stream must start with a header, got a data frame"),
    ([b"\xff\xfe\xfd garbage"], "Put: bad first message: undecodable PutRequest"),
    ([_put_header(payload_nbytes=100)],
     "payload_nbytes is 100, but 8 tokens make 2 full pages of 128 bytes"),
    ([_put_header(), encode_frame(PAGE)], "data frames add up to 128 bytes, the header "
                                          "announced 256"),
    ([_put_header(), encode_frame(PAGE * 3)], "data frames carry more than the 256 bytes"),
    ([_put_header(), encode_frame(PAGE), _put_header()], "a second header after 128 data bytes"),
    ([_put_header(), encode_frame(PAGE), b"\x12\x05ab"], "bad message after 128 data bytes"),
    ([_put_header(), b"\x12\x80\x01" + PAGE], "frames add up to 128 bytes, the header "
                                               "announced 256"),
])
def test_bad_put_streams_store_nothing(channel, client, messages, message):
    error = _put(channel, messages)
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert client.lookup(list(range(8)), NS).num_tokens == 0


def test_a_put_cancelled_midway_stores_nothing(channel, client):
    def messages():
        yield _put_header()
        yield encode_frame(PAGE)
        raise RuntimeError("client gave up")  # grpc cancels the call

    call = channel.stream_unary("/kvmesh.v1.KVStore/Put", **IDENTITY)
    with pytest.raises(grpc.RpcError) as info:
        call(messages(), timeout=10)
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    assert client.lookup(list(range(8)), NS).num_tokens == 0


def test_a_well_formed_raw_put_is_stored(channel, client):
    """The same raw path accepts an ordinary protobuf-encoded stream (any gRPC client)."""
    data = store_pb2.PutRequest(data=bytes(range(128)) * 2).SerializeToString()
    reply = _put(channel, [_put_header(), data])
    assert store_pb2.PutResponse.FromString(reply) == store_pb2.PutResponse(
        num_pages_stored=2, num_pages=2)
    got = client.get_closest_pages(NS, list(range(8)))
    assert bytes(got.payloads[0]) + bytes(got.payloads[1]) == bytes(range(128)) * 2
    assert client.delete(list(range(8)), NS) == 2


def test_delete_page_index_out_of_range(client):
    with pytest.raises(InvalidRequest, match=r"page indices \[5\] out of range: the tokens "
                                             "have 2 full pages"):
        client.delete(list(range(8)), NS, page_indices=[0, 5])


def test_put_pages_header_mismatch(channel):
    header = store_pb2.PutPagesHeader(keys=[b"k" * 16, b"j" * 16], page_nbytes=[10])
    call = channel.stream_unary("/kvmesh.v1.KVStore/PutPages", **IDENTITY)
    with pytest.raises(grpc.RpcError) as info:
        call(iter([store_pb2.PutPagesRequest(header=header).SerializeToString()]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PutPages: 2 keys but 1 page sizes" in info.value.details()
