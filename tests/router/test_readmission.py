"""Issue 22, operations: a worker that crashed and came back on its address is routed to again
within seconds. Real `kvmesh worker` (SmolLM2 on CPU) and `kvmesh router`, one worker, so a
request that succeeds after the restart was served by the restarted process."""

from __future__ import annotations

import tempfile
import time

import httpx
import pytest
from live_stack import API_KEYS, START_TIMEOUT_S, Proc

READMITTED_WITHIN_S = 3.0
DOWN_FOR_S = 25.0  # gRPC's default reconnect backoff reaches ~10 s by then


def _worker(port: int, tmp: str, n: int) -> Proc:
    return Proc(["worker", "--port", str(port), "--max-model-len", "512",
                 "--kv-cache-bytes", str(32 << 20)], f"{tmp}/worker{n}.log")


@pytest.fixture(scope="module")
def solo():
    tmp = tempfile.mkdtemp(prefix="kvmesh-readmit-test-")
    procs: list[Proc] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        worker = _worker(0, tmp, 0)
        procs.append(worker)
        address = worker.wait_listening(deadline)
        keys = [arg for key, tenant in API_KEYS.items() for arg in ("--api-key", f"{key}={tenant}")]
        router = Proc(["router", "--port", "0", "--secret", "test-secret", "--worker", address,
                       *keys], f"{tmp}/router.log")
        procs.append(router)
        url = "http://" + router.wait_listening(deadline)
        assert _wait_healthy(url, address, START_TIMEOUT_S) is not None
        yield url, procs, tmp
    finally:
        for proc in reversed(procs):
            proc.stop()


def _is_healthy(url: str, address: str) -> bool:
    return httpx.get(url + "/health", timeout=10).json()["workers"].get(address) is True


def _wait_healthy(url: str, address: str, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _is_healthy(url, address):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _complete(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60,
                      headers={"Authorization": "Bearer key-alice"},
                      json={"prompt": "The capital of France is", "max_tokens": 2})


def test_restarted_worker_is_routed_to_again_within_seconds(solo):
    url, procs, tmp = solo
    worker = procs[0]
    address = worker.address
    assert _complete(url).status_code == 200
    worker.kill()
    start = time.monotonic()
    while _is_healthy(url, address):  # the router notices the crash...
        assert time.monotonic() - start < 10, "router still routes to a dead worker"
        time.sleep(0.1)
    assert _complete(url).status_code == 503  # ...and has nowhere to send requests
    time.sleep(DOWN_FOR_S - (time.monotonic() - start))

    port = int(address.rsplit(":", 1)[1])
    restarted = _worker(port, tmp, 1)
    procs[0] = restarted
    assert restarted.wait_listening(time.monotonic() + START_TIMEOUT_S) == address
    took = _wait_healthy(url, address, READMITTED_WITHIN_S + 30)
    assert took is not None and took <= READMITTED_WITHIN_S, (
        f"restarted worker healthy in the router after {took} s")
    reply = _complete(url)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-kvmesh-worker"] == address
