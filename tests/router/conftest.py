"""A real local stack for the router's integration tests: `kvmesh store`, two `kvmesh worker`
processes (SmolLM2 on CPU, writing through to the store) and `kvmesh router`, all on port 0."""

from __future__ import annotations

import tempfile
import time

import httpx
import pytest
from live_stack import API_KEYS, START_TIMEOUT_S, Proc, Stack


@pytest.fixture(scope="module")
def stack():
    tmp = tempfile.mkdtemp(prefix="kvmesh-router-test-")
    procs: list[Proc] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        store = Proc(["store", "--port", "0", "--cpu-bytes", "256M"], f"{tmp}/store.log")
        procs.append(store)
        store_addr = store.wait_listening(deadline)
        workers = [Proc(["worker", "--port", "0", "--store", store_addr, "--max-model-len", "2048",
                         "--kv-cache-bytes", str(128 << 20)], f"{tmp}/worker{i}.log")
                   for i in range(2)]
        procs += workers
        worker_addrs = [w.wait_listening(deadline) for w in workers]
        keys = [arg for key, tenant in API_KEYS.items() for arg in ("--api-key", f"{key}={tenant}")]
        router = Proc(["router", "--port", "0", "--store", store_addr, "--secret", "test-secret",
                       *[a for w in worker_addrs for a in ("--worker", w)], *keys],
                      f"{tmp}/router.log")
        procs.append(router)
        url = "http://" + router.wait_listening(deadline)
        while time.monotonic() < deadline:  # both workers healthy and indexed
            health = httpx.get(url + "/health", timeout=30).json()
            if all(health["workers"].values()) and len(health["workers"]) == 2:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"workers not healthy: {health}")
        yield Stack(url, store, workers, router)
    finally:
        for proc in reversed(procs):
            proc.stop()
