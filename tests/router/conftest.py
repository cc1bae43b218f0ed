"""A real local stack for the router's integration tests: `kvmesh store`, two `kvmesh worker`
processes (SmolLM2 on CPU, writing through to the store) and `kvmesh router`, all on port 0."""

from __future__ import annotations

import pytest
from live_stack import running_stack


@pytest.fixture(scope="module")
def stack():
    with running_stack("kvmesh-router-test-",
                       ["--max-model-len", "2048", "--kv-cache-bytes", str(128 << 20)]) as s:
        yield s
