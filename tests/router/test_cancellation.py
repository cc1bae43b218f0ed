"""Issue 22, item 7, end to end: a client that disconnects stops its generation on the worker.

Real store, two real workers and the real router (the module's `stack`); the worker's own Stats
RPC says whether the request still runs and whether its pages came back."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest
from live_stack import Stack

from kvmesh.workers.service.client import WorkerClient, WorkerStats

LONG_BODY = {"prompt": "Once upon a time", "max_tokens": 1800, "ignore_eos": True,
             "temperature": 0}
FREED_WITHIN_S = 2.0


def _worker_token(stack: Stack) -> str | None:
    return getattr(stack, "worker_token", None) or None


def _stats(stack: Stack) -> dict[str, WorkerStats]:
    token = _worker_token(stack)
    out = {}
    for proc in stack.workers:
        with WorkerClient(proc.address, token=token) as client:
            out[proc.address] = client.stats()
    return out


def _wait(predicate, timeout: float, poll: float = 0.05) -> float | None:
    """Seconds until `predicate()` held, None if it never did within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(poll)
    return None


def _idle(stack: Stack) -> dict[str, WorkerStats]:
    """Wait for both workers to have nothing running (earlier tests' leftovers), then snapshot."""
    assert _wait(lambda: all(s.num_running == 0 and s.num_waiting == 0
                             for s in _stats(stack).values()), 60) is not None
    return _stats(stack)


def _open_request(stack: Stack, body: dict, path: str = "/v1/completions") -> socket.socket:
    """A raw HTTP/1.1 POST on its own socket, so the test decides when the client leaves."""
    parts = urlsplit(stack.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                 f"Authorization: Bearer key-alice\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _running_on(stack: Stack, timeout: float = 60) -> str:
    """The worker the request landed on, once its engine runs it."""
    found: list[str] = []

    def running() -> bool:
        found[:] = [addr for addr, s in _stats(stack).items() if s.num_running > 0]
        return bool(found)

    assert _wait(running, timeout) is not None, "the request never started on a worker"
    assert len(found) == 1
    return found[0]


def _assert_freed(stack: Stack, worker: str, before: WorkerStats) -> float:
    def freed() -> bool:
        s = _stats(stack)[worker]
        return (s.num_running == 0 and s.num_waiting == 0
                and s.num_pages_free >= before.num_pages_free)

    took = _wait(freed, FREED_WITHIN_S + 3)
    after = _stats(stack)[worker]
    assert took is not None and took <= FREED_WITHIN_S, (
        f"worker still busy {FREED_WITHIN_S}s after the client left: running="
        f"{after.num_running} free pages {after.num_pages_free} (before {before.num_pages_free})")
    return took


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_client_that_disconnects_stops_its_generation_on_the_worker(stack: Stack, stream: bool):
    before = _idle(stack)
    sock = _open_request(stack, {**LONG_BODY, "stream": stream})
    try:
        worker = _running_on(stack)
        if stream:  # tokens are flowing to the client before it leaves
            assert b"data: " in sock.recv(65536)
        time.sleep(0.5)  # a few decode steps: the request holds more pages than its prompt's
        busy = _stats(stack)[worker]
        assert busy.num_running == 1
        assert busy.num_pages_free < before[worker].num_pages_free
    finally:
        sock.close()
    _assert_freed(stack, worker, before[worker])
    # the router counted the departure, and the other worker never saw the request
    assert stack.metric("kvmesh:client_disconnects_total") >= 1


def test_client_that_disconnects_before_the_first_token_stops_the_request(stack: Stack):
    """Streamed, but gone while the request is still queued or in prefill (no headers sent)."""
    before = _idle(stack)
    long_prompt = " ".join(f"word{i}" for i in range(300))  # ~1,200 tokens of prefill
    body = {**LONG_BODY, "prompt": long_prompt, "max_tokens": 700, "stream": True}
    sock = _open_request(stack, body)
    try:
        worker = _running_on(stack)
    finally:
        sock.close()
    _assert_freed(stack, worker, before[worker])


def test_finished_requests_still_answer(stack: Stack):
    """Cancelling on disconnect must not cut a client that stays."""
    with stack.client() as client:
        reply = client.post("/v1/completions", json={**LONG_BODY, "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 8
