"""Scoped store tokens on a real store server: the internal token may do everything; a client
token reaches only its own tenant's namespaces (the salt in the request body is ignored), a
read-only one cannot write, and neither may use the page-key calls."""

from __future__ import annotations

import json

import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.client.store_client import PermissionDenied, Unauthenticated
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.rpc.auth import tenant_salt
from kvmesh.cachestore.rpc.server import serve_store

SECRET = "deployment-secret"
INTERNAL = "internal-token-0123456789"
ALICE_RW = "alice-read-write-token"
BOB_RO = "bob-read-only-token-x"
NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32, page_size=2)
ALICE_NS = NS.with_salt(tenant_salt(SECRET, "alice"))
BOB_NS = NS.with_salt(tenant_salt(SECRET, "bob"))
TOKENS = [1, 2, 3, 4]
KV = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 1, 4)
FORGED = -KV


def _token_file(tmp_path, entries) -> str:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": entries}))
    return str(path)


@pytest.fixture
def server(tmp_path):
    token_file = _token_file(tmp_path, [
        {"token": ALICE_RW, "tenant": "alice", "access": "read-write"},
        {"token": BOB_RO, "tenant": "bob", "access": "read"},
    ])
    srv = serve_store(StoreConfig(port=0, cpu_bytes=1 << 20, token=INTERNAL,
                                  token_file=token_file, tenant_secret=SECRET))
    yield srv
    srv.stop(grace=0)


def _client(server, token):
    return StoreClient(server.target, token=token)


def test_internal_token_reaches_every_namespace(server):
    with _client(server, INTERNAL) as internal:
        assert internal.put(TOKENS, KV, ALICE_NS) == 2
        assert internal.put(TOKENS, KV, BOB_NS) == 2
        assert internal.has_pages(ALICE_NS.page_keys(TOKENS)) == [True, True]


def test_client_token_reads_its_own_tenant_whatever_the_body_says(server):
    with _client(server, INTERNAL) as internal:
        internal.put(TOKENS, KV, ALICE_NS)  # what alice's traffic through a worker stored
    with _client(server, ALICE_RW) as alice, _client(server, BOB_RO) as bob:
        for body_ns in (NS, ALICE_NS, BOB_NS):
            hit = alice.get_closest(TOKENS, body_ns)
            assert hit is not None and torch.equal(hit.kv, KV)
            assert bob.get_closest(TOKENS, body_ns) is None  # bob never sees alice's pages
            assert bob.lookup(TOKENS, body_ns).num_tokens == 0


def test_forged_pages_land_only_in_the_writers_own_tenant(server):
    with _client(server, ALICE_RW) as alice:
        assert alice.put(TOKENS, FORGED, BOB_NS) == 2  # asks for bob's namespace
    with _client(server, INTERNAL) as internal:
        assert internal.lookup(TOKENS, BOB_NS).num_tokens == 0  # bob's traffic is untouched
        assert torch.equal(internal.get_closest(TOKENS, ALICE_NS).kv, FORGED)


def test_read_only_token_cannot_write_or_delete(server):
    with _client(server, BOB_RO) as bob:
        with pytest.raises(PermissionDenied, match="may only read"):
            bob.put(TOKENS, FORGED, BOB_NS)
        with pytest.raises(PermissionDenied, match="may only read"):
            bob.delete(TOKENS, BOB_NS)
    with _client(server, INTERNAL) as internal:
        assert internal.lookup(TOKENS, BOB_NS).num_tokens == 0


def test_client_tokens_may_not_use_page_key_calls(server):
    with _client(server, INTERNAL) as internal:
        internal.put(TOKENS, KV, BOB_NS)
    keys = BOB_NS.page_keys(TOKENS)
    with _client(server, ALICE_RW) as alice:
        for call in (lambda: alice.has_pages(keys), lambda: alice.get_pages(keys)):
            with pytest.raises(PermissionDenied, match="internal token"):
                call()
        assert alice.stats()  # metadata about capacity, no page contents


def test_unknown_token_is_unauthenticated(server):
    with _client(server, "not-a-token-at-all") as stranger:
        with pytest.raises(Unauthenticated):
            stranger.lookup(TOKENS, NS)


@pytest.mark.parametrize("entries, message", [
    ([{"token": "short", "tenant": "a"}], "at least 16"),
    ([{"token": ALICE_RW, "tenant": ""}], "non-empty tenant"),
    ([{"token": ALICE_RW, "tenant": "a", "access": "admin"}], "access must be"),
    ([{"token": ALICE_RW, "tenant": "a"}, {"token": ALICE_RW, "tenant": "b"}], "twice"),
    ("not a list", "must be a list"),
])
def test_bad_token_files_are_refused(tmp_path, entries, message):
    config = StoreConfig(port=0, cpu_bytes=1 << 20, token=INTERNAL, tenant_secret=SECRET,
                         token_file=_token_file(tmp_path, entries))
    with pytest.raises(InvalidConfig, match=message):
        serve_store(config)


def test_token_file_needs_the_tenant_secret(tmp_path):
    with pytest.raises(InvalidConfig, match="tenant secret"):
        StoreConfig(token_file=_token_file(tmp_path, []))
