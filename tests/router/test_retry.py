"""Failure handling end to end through the HTTP app, with workers that fail on cue.

The real worker cannot be told to fail at an exact point, so these workers are real gRPC
servers (grpc.aio, loopback, port 0) running a scripted Worker servicer; everything on the
router side (pool, event follower, service, app) is the real code."""

from __future__ import annotations

import asyncio
import json

import grpc
from aiohttp.test_utils import TestClient, TestServer

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc.wire import namespace_to_spec
from kvmesh.router.config import RouterConfig
from kvmesh.router.http.app import WORKER_HEADER, build_app
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.routing.index import PrefixIndex
from kvmesh.router.routing.pool import WorkerPool
from kvmesh.router.service import Router
from kvmesh.v1 import worker_pb2, worker_pb2_grpc

NS = Namespace(model="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", page_size=4)
PROMPT = list(range(1, 11))


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """Streams tokens 5, 6 ("a", "b") or fails as told: "refuse" (UNAVAILABLE before any token),
    "crash_after_token" (INTERNAL after the first), "invalid" (INVALID_ARGUMENT),
    "request_failed" (INTERNAL marked as the request's own failure, as a quarantine is)."""

    def __init__(self, behavior: str = "ok") -> None:
        self.behavior = behavior
        self.num_calls = 0
        self.requests: list[worker_pb2.GenerateRequest] = []

    async def Generate(self, request, context):
        self.num_calls += 1
        self.requests.append(request)
        if self.behavior == "refuse":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        if self.behavior == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token 99999 out of vocabulary")
        if self.behavior == "request_failed":
            context.set_trailing_metadata((("kvmesh-failure-scope", "request"),))
            await context.abort(grpc.StatusCode.INTERNAL, "request failed in the engine")
        yield worker_pb2.GenerateResponse(request_id=request.request_id, token_ids=[5], text="a")
        if self.behavior == "crash_after_token":
            await context.abort(grpc.StatusCode.INTERNAL, "engine crashed")
        usage = worker_pb2.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=2)
        yield worker_pb2.GenerateResponse(request_id=request.request_id, token_ids=[6], text="b",
                                          finish_reason=worker_pb2.FINISH_REASON_LENGTH,
                                          usage=usage)

    async def Stats(self, request, context):
        return worker_pb2.WorkerStats(model="m", page_size=4, num_pages_total=8, num_pages_free=8,
                                      max_model_len=64, namespace=namespace_to_spec(NS))

    async def KvEvents(self, request, context):
        yield worker_pb2.KvEvent(seq=1, cleared=worker_pb2.AllCleared(epoch=1))
        await asyncio.Event().wait()  # an idle, open stream


async def run_case(first: str, body: dict) -> tuple[int, dict, str, list[ScriptedWorker], dict]:
    """Workers [first, ok]; ties go to the first, so `first` is always tried first."""
    servicers = [ScriptedWorker(first), ScriptedWorker("ok")]
    servers, addresses = [], []
    for servicer in servicers:
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
    config = RouterConfig(workers=tuple(addresses), health_interval_s=0.1)
    index, metrics = PrefixIndex(), RouterMetrics()
    pool = WorkerPool(config, index, metrics)
    await pool.start()
    while len(pool.available()) < 2:
        await asyncio.sleep(0.02)
    router = Router(config, None, pool, index, metrics)  # type: ignore[arg-type]  # ids only
    client = TestClient(TestServer(build_app(router)))
    await client.start_server()
    try:
        response = await client.post("/v1/completions", json={"prompt": PROMPT, **body})
        text = await response.text()
        headers = dict(response.headers)
        status = response.status
    finally:
        await client.close()
        await pool.close()
        for server in servers:
            await server.stop(None)
    worker = {addresses[0]: "first", addresses[1]: "ok", "": ""}[headers.get(WORKER_HEADER, "")]
    first_handle = pool.workers[addresses[0]]
    return status, {"worker": worker, "retries": metrics.retries.samples()}, text, servicers, {
        "first_available": first_handle.is_healthy, "first_failures": first_handle.num_failures}


def sse_events(text: str) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in text.splitlines() if line.startswith("data: ")]


def test_streamed_request_moves_to_another_worker_before_its_first_token():
    status, info, text, (first, ok), state = asyncio.run(
        run_case("refuse", {"max_tokens": 2, "stream": True}))
    assert status == 200 and info["worker"] == "ok"
    events = sse_events(text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", "b"]
    assert events[-1] == "[DONE]"
    assert info["retries"] == {(("code", "UNAVAILABLE"),): 1.0}
    assert (first.num_calls, ok.num_calls) == (1, 1)
    assert state["first_available"] is False  # UNAVAILABLE took it out at once


def test_streamed_request_that_already_sent_tokens_goes_on_on_another_worker():
    """Migration: the next worker gets the prompt plus the tokens sent, and what is left of
    max_tokens (this scripted worker then streams its usual tokens regardless)."""
    status, info, text, (first, ok), _ = asyncio.run(
        run_case("crash_after_token", {"max_tokens": 2, "stream": True}))
    assert status == 200 and info["worker"] == "first"
    events = sse_events(text)
    assert events[0]["choices"][0]["text"] == "a"
    assert not any("error" in e for e in events[:-1]) and events[-1] == "[DONE]"
    assert (first.num_calls, ok.num_calls) == (1, 1)
    (resumed,) = ok.requests
    assert list(resumed.prompt_token_ids) == [*PROMPT, 5]
    assert resumed.sampling.max_tokens == 1


def test_streamed_request_that_cannot_be_resumed_reports_the_failure_in_band():
    """Stop strings: the failed worker may have held back text that starts one."""
    status, info, text, (first, ok), _ = asyncio.run(
        run_case("crash_after_token", {"max_tokens": 2, "stream": True, "stop": ["zz"]}))
    assert status == 200 and info["worker"] == "first"  # headers went out with the first token
    events = sse_events(text)
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1]["error"]["code"] == "worker_failed"
    assert events[2:] == ["[DONE]"]
    assert ok.num_calls == 0


def test_whole_response_is_retried_even_after_tokens():
    status, info, text, (first, ok), _ = asyncio.run(run_case("crash_after_token",
                                                              {"max_tokens": 2}))
    body = json.loads(text)
    assert status == 200 and info["worker"] == "ok"
    assert body["choices"][0]["text"] == "ab" and body["usage"]["completion_tokens"] == 2
    assert (first.num_calls, ok.num_calls) == (1, 1)


def test_worker_rejecting_the_input_is_a_400_and_not_retried():
    status, info, text, (first, ok), _ = asyncio.run(run_case("invalid", {"max_tokens": 2}))
    assert status == 400
    error = json.loads(text)["error"]
    assert error["code"] == "invalid_request" and "out of vocabulary" in error["message"]
    assert (first.num_calls, ok.num_calls) == (1, 0) and info["retries"] == {}


def test_worker_rejecting_the_input_is_not_held_against_it():
    for body in ({"max_tokens": 2}, {"max_tokens": 2, "stream": True}):
        status, _, text, _, state = asyncio.run(run_case("invalid", body))
        assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"
        assert state == {"first_available": True, "first_failures": 0}


def test_request_that_failed_alone_in_the_engine_is_a_500_not_retried_nor_held_against_it():
    for body in ({"max_tokens": 2}, {"max_tokens": 2, "stream": True}):
        status, info, text, (first, ok), state = asyncio.run(run_case("request_failed", body))
        assert status == 500
        error = json.loads(text)["error"]
        assert error["code"] == "request_failed" and error["type"] == "internal_error"
        assert "request failed in the engine" in error["message"]
        assert (first.num_calls, ok.num_calls) == (1, 0) and info["retries"] == {}
        assert state == {"first_available": True, "first_failures": 0}
