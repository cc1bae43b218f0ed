"""The router's per-worker load gauges follow the worker: they read the requests while they run,
0 once they end, and 0 once the worker is gone (never its last answer, forever). A real store,
one SmolLM2 worker process (CPU) and `kvmesh router`."""

from __future__ import annotations

import concurrent.futures
import time

from live_stack import Stack, running_stack

NUM_REQUESTS = 6


def _generate(stack: Stack, i: int, max_tokens: int) -> int:
    with stack.client() as client:
        body = {"prompt": f"Request {i}: count slowly from one to a hundred.",
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        return client.post("/v1/completions", json=body).status_code


def _load(stack: Stack) -> float:
    return (stack.metric("kvmesh:num_requests_running")
            + stack.metric("kvmesh:num_requests_waiting"))


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_load_gauges_return_to_zero_when_requests_end_and_when_the_worker_dies():
    with running_stack("kvmesh-gauges-", ["--max-model-len", "1024",
                                          "--kv-cache-bytes", str(64 << 20)],
                       roles=("both",)) as stack, \
            concurrent.futures.ThreadPoolExecutor(NUM_REQUESTS) as pool:
        worker = stack.workers[0].address
        # 1. requests end: the gauges go back to 0 within a few Stats polls (1 s apart)
        futures = [pool.submit(_generate, stack, i, 48) for i in range(NUM_REQUESTS)]
        assert _wait_for(lambda: _load(stack) >= 1, 60), "load never showed while running"
        assert [f.result() for f in futures] == [200] * NUM_REQUESTS
        assert _wait_for(lambda: _load(stack) == 0, 5), _load(stack)
        assert stack.metric("kvmesh:num_requests_running", worker=worker) == 0
        # 2. the worker dies mid-run: its last answer does not read on
        futures = [pool.submit(_generate, stack, i, 400) for i in range(NUM_REQUESTS)]
        assert _wait_for(lambda: stack.metric("kvmesh:num_requests_running") >= 1, 60)
        stack.workers[0].kill()
        assert _wait_for(lambda: stack.metric("kvmesh:worker_healthy", worker=worker) == 0, 15)
        assert _load(stack) == 0
        assert all(f.result() >= 500 for f in futures)
