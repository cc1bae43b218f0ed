"""Bearer-token auth and TLS on a real store server."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.client.store_client import StoreUnavailable, Unauthenticated
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.rpc.server import serve_store

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32, page_size=2)
KV = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 1, 4)


@pytest.fixture
def server():
    srv = serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, token="s3cret"))
    yield srv
    srv.stop(grace=0)


@pytest.mark.parametrize("token, message", [(None, "missing authorization"),
                                            ("wrong", "wrong bearer token")])
def test_missing_or_wrong_token_is_unauthenticated(server, token, message):
    with StoreClient(server.target, token=token) as client:
        for call in (lambda: client.put([1, 2], KV, NS), lambda: client.get_closest([1, 2], NS),
                     lambda: client.lookup([1, 2], NS), client.stats,
                     lambda: client.has_pages([b"k" * 16])):
            with pytest.raises(Unauthenticated, match=message):
                call()
    with StoreClient(server.target, token="s3cret") as client:
        assert client.lookup([1, 2], NS).num_tokens == 0  # nothing got through


def test_right_token_works_and_health_needs_none(server):
    with StoreClient(server.target, token="s3cret") as client:
        assert client.put([1, 2], KV, NS) == 1
        assert torch.equal(client.get_closest([1, 2], NS).kv, KV)
    with grpc.insecure_channel(server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_with_token(tmp_path):
    cert, key = _self_signed(tmp_path)
    srv = serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, token="t", tls_cert=cert,
                                  tls_key=key))
    try:
        with StoreClient(srv.target, token="t", tls=cert) as client:
            assert client.put([5, 6, 7], torch.ones(1, 2, 3, 1, 4), NS) == 1
            assert torch.equal(client.get_closest([5, 6], NS).kv, torch.ones(1, 2, 2, 1, 4))
        with StoreClient(srv.target, token="t", timeout=5) as plain:  # no TLS: cannot talk
            with pytest.raises(StoreUnavailable):
                plain.lookup([5, 6], NS)
        # a front store whose remote tier reaches this one over TLS with its token
        front = serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, remote=srv.target,
                                        remote_token="t", remote_tls_ca=cert))
        with front, StoreClient(front.target) as client:
            assert client.lookup([5, 6], NS).tiers == ["remote"]
            assert torch.equal(client.get_closest([5, 6, 7], NS).kv, torch.ones(1, 2, 2, 1, 4))
    finally:
        srv.stop(grace=0)


def _echo_server(interceptor):
    """A bare gRPC server with one method of each kind (echoing), health and reflection."""
    from concurrent import futures

    from grpc_health.v1 import health
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    unary = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    out = grpc.unary_stream_rpc_method_handler(lambda request, context: iter((request,)))
    into = grpc.stream_unary_rpc_method_handler(lambda requests, context: b"".join(requests))
    both = grpc.stream_stream_rpc_method_handler(lambda requests, context: requests)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Echo", {"Unary": unary, "Out": out, "In": into, "Both": both}),))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    reflection.enable_server_reflection(("t.Echo", reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_one_interceptor_for_store_and_worker_every_call_kind():
    from kvmesh.cachestore.rpc.auth import BearerAuth

    server, target = _echo_server(BearerAuth.internal("s3cret"))
    try:
        with grpc.insecure_channel(target) as channel:
            calls = {
                "Unary": lambda md: channel.unary_unary("/t.Echo/Unary")(b"x", metadata=md),
                "Out": lambda md: b"".join(channel.unary_stream("/t.Echo/Out")(b"x",
                                                                               metadata=md)),
                "In": lambda md: channel.stream_unary("/t.Echo/In")(iter([b"x"]), metadata=md),
                "Both": lambda md: b"".join(channel.stream_stream("/t.Echo/Both")(
                    iter([b"x"]), metadata=md)),
            }
            for name, call in calls.items():
                assert call((("authorization", "Bearer s3cret"),)) == b"x", name
                for metadata, message in [((), "missing authorization"),
                                          ((("authorization", "Bearer wrong"),),
                                           "wrong bearer token"),
                                          ((("authorization", "s3cret"),), "wrong bearer token")]:
                    with pytest.raises(grpc.RpcError) as info:
                        call(metadata)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                    assert info.value.details() == message
            # a method the server lacks: UNAUTHENTICATED without a token, UNIMPLEMENTED with it
            missing = channel.unary_unary("/t.Echo/Missing")
            with pytest.raises(grpc.RpcError) as info:
                missing(b"x")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                missing(b"x", metadata=(("authorization", "Bearer s3cret"),))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # health is open; reflection is not
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflect = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            with pytest.raises(grpc.RpcError) as info:
                list(reflect(iter([b""])))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)
