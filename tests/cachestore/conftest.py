"""Fixtures shared by the gRPC store tests: a client of the module's `server` fixture (each module
picks its server's scope and configuration), once per data plane: key-level bytes over gRPC
frames with same-host shared memory (segment gets, puts copied into the server's shared arenas),
and over NIXL with shared memory off (UCX over TCP on loopback, as between hosts: NIXL gets and
puts)."""

from __future__ import annotations

import os

import pytest

# before the first NIXL agent of this process: UCX reads its settings once
os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from kvmesh.cachestore import StoreClient  # noqa: E402
from kvmesh.cachestore.dataplane.agent import nixl_api  # noqa: E402

DATA_PLANES = ["grpc", pytest.param("nixl", marks=pytest.mark.skipif(
    nixl_api() is None, reason="nixl is not installed (the `dataplane` extra)"))]


@pytest.fixture(params=DATA_PLANES)
def client(server, request):
    # a module whose server offers no data plane defines its own gRPC-only `client`
    assert request.param == "grpc" or getattr(server, "data_plane", None) is not None
    with StoreClient(server.target, data_plane=request.param,
                     shared_memory=None if request.param == "grpc" else False) as c:
        assert c.data_plane == request.param
        yield c
