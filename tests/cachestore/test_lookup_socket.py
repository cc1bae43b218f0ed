"""The lookup socket (cachestore/rpc/lookup_*.py) on a real store server: it answers exactly what
gRPC Lookup answers, for the internal token and for tenant tokens (each its own tenant's
salt, whatever the request says); a missing or wrong token is UNAUTHENTICATED; a client falls
back to gRPC Lookup when no socket is offered or it stops answering. Slow or silent peers are
cut off by whole-exchange deadlines and cannot crowd authenticated clients out."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.client.lookup import AsyncLookupSocket, LookupSocket, socket_host
from kvmesh.cachestore.client.store_client import InvalidRequest, Unauthenticated
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.keys import tokens_to_bytes
from kvmesh.cachestore.rpc import lookup_wire, wire
from kvmesh.cachestore.rpc.auth import tenant_salt
from kvmesh.cachestore.rpc.server import serve_store
from kvmesh.v1 import store_pb2

SECRET = "deployment-secret"
INTERNAL = "internal-token-0123456789"
ALICE = "alice-read-write-token"
BOB = "bob-read-only-token-x"
NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32, page_size=2)
ALICE_NS = NS.with_salt(tenant_salt(SECRET, "alice"))
TOKENS = list(range(100, 111))  # 5 full pages and one token


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("tokens") / "tokens.json"
    token_file.write_text(json.dumps({"tokens": [
        {"token": ALICE, "tenant": "alice", "access": "read-write"},
        {"token": BOB, "tenant": "bob", "access": "read"}]}))
    srv = serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, token=INTERNAL,
                                  token_file=str(token_file), tenant_secret=SECRET,
                                  data_plane="grpc"))
    with StoreClient(srv.target, token=INTERNAL) as client:
        client.put(TOKENS[:10], torch.zeros(1, 2, 10, 1, 4), NS)  # 5 pages, no tenant
        client.put(TOKENS[:6], torch.zeros(1, 2, 6, 1, 4), ALICE_NS)  # alice's 3 pages
    yield srv
    srv.stop(grace=0)


def _request(ns: Namespace, tokens: list[int]) -> bytes:
    return store_pb2.LookupRequest(namespace=wire.namespace_to_spec(ns),
                                   token_ids=tokens_to_bytes(tokens)).SerializeToString()


@pytest.mark.parametrize("token", [INTERNAL, ALICE, BOB])
def test_socket_answers_what_grpc_lookup_answers(server, token):
    sock = LookupSocket("127.0.0.1", server.lookups.port, token, timeout=5.0)
    with StoreClient(server.target, token=token, lookup_socket=False) as grpc_client, \
            StoreClient(server.target, token=token) as client:
        for ns in (NS, ALICE_NS, NS.with_salt("forged")):
            for tokens in (TOKENS, TOKENS[:5], [7, *TOKENS], TOKENS[:1]):
                by_grpc = grpc_client.lookup(tokens, ns)
                assert client.lookup(tokens, ns) == by_grpc
                reply = store_pb2.LookupResponse.FromString(sock.call(_request(ns, tokens)))
                assert (reply.num_tokens, [wire.tier_name(t) for t in reply.tiers]) == (
                    by_grpc.num_tokens, by_grpc.tiers)
        assert client._lookups is not None and client._lookups._socket is not None  # used it
    sock.close()


def test_tenants_see_only_their_own_pages(server):
    def found(token: str, ns: Namespace) -> int:
        with StoreClient(server.target, token=token) as client:
            return client.lookup(TOKENS, ns).num_tokens

    # the salt in the request is replaced by the token's tenant's
    assert [found(ALICE, ns) for ns in (NS, ALICE_NS, NS.with_salt("x"))] == [6, 6, 6]
    assert [found(BOB, ns) for ns in (NS, ALICE_NS)] == [0, 0]
    assert [found(INTERNAL, ns) for ns in (NS, ALICE_NS, NS.with_salt("x"))] == [10, 6, 0]


@pytest.mark.parametrize("token, message", [(None, "missing authorization"),
                                            ("wrong-token-0123456789", "wrong bearer token"),
                                            (INTERNAL[:-1], "wrong bearer token")])
def test_missing_or_wrong_token_is_unauthenticated(server, token, message):
    sock = LookupSocket("127.0.0.1", server.lookups.port, token, timeout=5.0)
    with pytest.raises(Unauthenticated, match=f"^{message}$"):
        sock.call(_request(NS, TOKENS))
    with StoreClient(server.target, token=token, lookup_socket=False) as client, \
            pytest.raises(Unauthenticated, match=f"^{message}$"):
        client.lookup(TOKENS, NS)  # gRPC says the same
    sock.close()


def test_bad_requests_get_grpc_lookups_errors(server):
    sock = LookupSocket("127.0.0.1", server.lookups.port, INTERNAL, timeout=5.0)
    with pytest.raises(InvalidRequest, match="undecodable LookupRequest"):
        sock.call(b"\xff\xff\xff")
    empty = store_pb2.LookupRequest(namespace=wire.namespace_to_spec(NS)).SerializeToString()
    with pytest.raises(InvalidRequest, match="token_ids is empty"):
        sock.call(empty)
    # the connection stays usable after an error reply
    reply = store_pb2.LookupResponse.FromString(sock.call(_request(NS, TOKENS)))
    assert reply.num_tokens == 10
    sock.close()


def test_async_socket_answers_the_same(server):
    async def body():
        sock = AsyncLookupSocket("127.0.0.1", server.lookups.port, ALICE)
        try:
            ok = [await sock.call(_request(ns, TOKENS)) for ns in (NS, NS)]
            bad = await AsyncLookupSocket("127.0.0.1", server.lookups.port, "nope").call(
                _request(NS, TOKENS))
        finally:
            sock.close()
        return ok, bad

    ok, (code, details) = asyncio.run(body())
    for status, raw in ok:
        assert status is None and store_pb2.LookupResponse.FromString(raw).num_tokens == 6
    assert (code.name, details) == ("UNAUTHENTICATED", b"wrong bearer token")


def test_client_falls_back_to_grpc_when_the_socket_goes(server):
    with StoreClient(server.target, token=INTERNAL) as client:
        assert client.lookup(TOKENS, NS).num_tokens == 10
        lookups = client._lookups
        assert lookups is not None and lookups._socket is not None
        lookups._socket.address = ("127.0.0.1", 1)  # nothing listens there: refused
        lookups._socket.close()  # no idle connection to reuse
        assert client.lookup(TOKENS, NS).num_tokens == 10  # by gRPC
        assert lookups._socket is None


def test_socket_hosts_and_frames():
    assert socket_host("unix:/tmp/x.sock") is None
    assert [socket_host(t) for t in ("127.0.0.1:5", "dns:///h:5", "[::1]:5")] == [
        "127.0.0.1", "h", "::1"]
    assert lookup_wire.split_reply(lookup_wire.reply_frame(None, b"x")[4:]) == (None, b"x")


def test_router_probe_uses_the_socket_with_the_same_scopes(server):
    from kvmesh.router.metrics import RouterMetrics
    from kvmesh.router.routing.store_probe import StoreProbe

    async def body(token: str) -> tuple[list[int], dict, bool]:
        metrics = RouterMetrics()
        probe = StoreProbe(server.target, token, metrics)
        try:
            found = [await probe.num_pages(ns, TOKENS) for ns in (NS, ALICE_NS)]
        finally:
            await probe.close()
        return found, metrics.store_lookup_errors.samples(), probe._socket is not None

    def run(token: str) -> tuple[list[int], dict, bool]:
        got = asyncio.run(body(token))
        # a loaded CI machine may answer the first lookup late (a counted miss): retry once
        return asyncio.run(body(token)) if got[1] else got

    assert run(INTERNAL) == ([5, 3], {}, True)
    assert run(ALICE) == ([3, 3], {}, True)
    found, errors, is_socket = run("wrong-token-0123456789")
    assert (found, is_socket) == ([0, 0], False) and sum(errors.values()) == 2


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (nothing else is sent to it)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_slow_drip_hello_and_frame_are_cut_off(server, monkeypatch):
    monkeypatch.setattr(server.lookups, "hello_timeout", 0.5)
    monkeypatch.setattr(server.lookups, "frame_timeout", 0.5)
    hello = lookup_wire.hello(INTERNAL)
    with socket.create_connection(("127.0.0.1", server.lookups.port)) as sock:
        start = time.monotonic()
        for i in range(len(hello) - 1):  # one byte every 0.05 s: each recv comes in time
            try:
                sock.sendall(hello[i:i + 1])
            except ConnectionError:
                break
            if _closed_within(sock, 0.05):
                break
        elapsed = time.monotonic() - start
        assert 0.4 < elapsed < 1.2  # the hello's deadline, not all of its 1.6 s of drip
        assert _closed_within(sock, 1.0)
    # after a good hello, a request frame that trickles in is cut off the same way
    request = lookup_wire.frame(_request(NS, TOKENS))
    with socket.create_connection(("127.0.0.1", server.lookups.port)) as sock:
        sock.sendall(hello)
        start = time.monotonic()
        for i in range(len(request) - 1):
            try:
                sock.sendall(request[i:i + 1])
            except ConnectionError:
                break
            if _closed_within(sock, 0.05):
                break
        assert 0.4 < time.monotonic() - start < 1.2


def test_unauthenticated_flood_does_not_stop_authenticated_lookups(server, monkeypatch):
    listener = server.lookups
    monkeypatch.setattr(listener, "hello_timeout", 1.0)
    sock = LookupSocket("127.0.0.1", listener.port, INTERNAL, timeout=5.0)
    assert store_pb2.LookupResponse.FromString(sock.call(_request(NS, TOKENS))).num_tokens == 10
    flood = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(40)]
    try:
        for peer in flood:
            peer.sendall(b"KV")  # half a magic, then nothing
        # only max_unauthenticated of them are kept; the rest are closed at once
        closed = sum(_closed_within(peer, 0.2) for peer in flood)
        assert closed >= 40 - listener.max_unauthenticated
        assert listener._unauthenticated <= listener.max_unauthenticated
        # the pooled, authenticated connection still answers
        for _ in range(20):
            reply = store_pb2.LookupResponse.FromString(sock.call(_request(NS, TOKENS)))
            assert reply.num_tokens == 10
        with StoreClient(server.target, token=INTERNAL) as client:  # socket or gRPC: answers
            assert client.lookup(TOKENS, NS).num_tokens == 10
        # once the hello deadline has passed, the flood is gone and new clients connect
        assert all(_closed_within(peer, 2.0) for peer in flood)
        fresh = LookupSocket("127.0.0.1", listener.port, ALICE, timeout=5.0)
        assert store_pb2.LookupResponse.FromString(
            fresh.call(_request(NS, TOKENS))).num_tokens == 6
        fresh.close()
    finally:
        for peer in flood:
            peer.close()
        sock.close()


def test_unreadable_reply_closes_the_connection(server, monkeypatch):
    sock = LookupSocket("127.0.0.1", server.lookups.port, INTERNAL, timeout=5.0)

    def broken(reply):
        raise lookup_wire.ProtocolError("garbled")

    monkeypatch.setattr(lookup_wire, "split_reply", broken)
    with pytest.raises(lookup_wire.ProtocolError):
        sock.call(_request(NS, TOKENS))
    assert sock._idle == []  # not pooled
    sock.close()
