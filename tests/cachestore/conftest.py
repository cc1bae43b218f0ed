"""Fixtures shared by the gRPC store tests: a client of the module's `server` fixture (each module
picks its server's scope and configuration)."""

from __future__ import annotations

import pytest

from kvmesh.cachestore import StoreClient


@pytest.fixture
def client(server):
    with StoreClient(server.target) as c:
        yield c
