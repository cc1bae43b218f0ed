"""Hostile HTTP inputs against the real aiohttp app on a loopback socket: every bad body gets a
4xx with an OpenAI error body, big prompts never stall the event loop, slow clients time out and
a client that leaves is not a server error.

The router is real (config, pool, service, app, the SmolLM2 tokenizer); its one worker address
answers nothing, so a request that passes every check ends in 503, which is never an input's."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import grpc
import pytest
from aiohttp import ClientSession, web

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc.wire import namespace_to_spec
from kvmesh.router.config import RouterConfig
from kvmesh.router.http.app import build_app
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.routing.index import PrefixIndex
from kvmesh.router.routing.pool import WorkerPool
from kvmesh.router.service import Router
from kvmesh.router.tokenizer import PromptTokenizer
from kvmesh.v1 import worker_pb2, worker_pb2_grpc

MAX_MODEL_LEN = 2048
NS = Namespace(model="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", page_size=4)
TEN_MB = 10_000_000


def _dead_address() -> str:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer(RouterConfig(workers=("h:1",)).model_path)


class App:
    """The real app served on a loopback port (no worker takes requests)."""

    def __init__(self, tokenizer: PromptTokenizer | None, handler_cancellation: bool = False,
                 workers: tuple[str, ...] = (), **config) -> None:
        self.config = RouterConfig(workers=workers or (_dead_address(),),
                                   max_model_len=MAX_MODEL_LEN, **config)
        self.metrics = RouterMetrics()
        index = PrefixIndex()
        self.router = Router(self.config, tokenizer, WorkerPool(self.config, index, self.metrics),
                             index, self.metrics)  # type: ignore[arg-type]
        # as `kvmesh router` serves it (aiohttp's TestServer would turn on handler_cancellation)
        self.runner = web.AppRunner(build_app(self.router), access_log=None,
                                    handler_cancellation=handler_cancellation)

    async def __aenter__(self) -> App:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.session = ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def post(self, path: str, raw: bytes) -> tuple[int, dict]:
        async with self.session.post(self.url(path), data=raw,
                                     headers={"Content-Type": "application/json"}) as response:
            return response.status, json.loads(await response.read())


def _body(**fields) -> bytes:
    return json.dumps({"prompt": "hello", **fields}).encode()


DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_BODIES = [
    ("deep nesting", DEEP, 400, "invalid_request", None),
    ("deep nesting in a field", b'{"prompt": ' + DEEP + b"}", 400, "invalid_request", None),
    ("5,000-digit max_tokens", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400,
     "invalid_request", None),
    ("4,000-digit max_tokens", b'{"prompt": "x", "max_tokens": ' + b"9" * 4000 + b"}", 400,
     "invalid_request", "max_tokens"),
    ("max_tokens 2**32", _body(max_tokens=1 << 32), 400, "invalid_request", "max_tokens"),
    ("token id 2**32", _body(prompt=[1, 1 << 32]), 400, "invalid_request", "prompt"),
    ("token id 2**31", _body(prompt=[1 << 31]), 400, "invalid_request", "prompt"),
    ("token id -1", _body(prompt=[-1]), 400, "invalid_request", "prompt"),
    ("bad UTF-8", b'{"prompt": "\xff\xfe"}', 400, "invalid_request", None),
    ("not JSON", b"{prompt", 400, "invalid_request", None),
    ("temperature NaN", b'{"prompt": "x", "temperature": NaN}', 400, "invalid_request",
     "temperature"),
    ("temperature inf", b'{"prompt": "x", "temperature": Infinity}', 400, "invalid_request",
     "temperature"),
    ("temperature < 0", _body(temperature=-0.5), 400, "invalid_request", "temperature"),
    ("top_p 0", _body(top_p=0), 400, "invalid_request", "top_p"),
    ("top_p > 1", _body(top_p=1.01), 400, "invalid_request", "top_p"),
    ("top_p NaN", b'{"prompt": "x", "top_p": NaN}', 400, "invalid_request", "top_p"),
    ("top_k -2", _body(top_k=-2), 400, "invalid_request", "top_k"),
    ("top_k 2**40", _body(top_k=1 << 40), 400, "invalid_request", "top_k"),
    ("n 0", _body(n=0), 400, "invalid_request", "n"),
    ("n 17", _body(n=17), 400, "invalid_request", "n"),
    ("max_tokens 0", _body(max_tokens=0), 400, "invalid_request", "max_tokens"),
    ("17 stop strings", _body(stop=[str(i) for i in range(17)]), 400, "invalid_request",
     "stop"),
    ("17 MB body", _body(prompt="x" * (17 << 20)), 413, "request_too_large", None),
]


@pytest.mark.parametrize("raw, status, code, param",
                         [case[1:] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES])
def test_bad_body_gets_a_4xx_with_an_openai_error_body(raw, status, code, param, caplog):
    async def run() -> tuple[int, dict, RouterMetrics]:
        async with App(None) as app:
            got_status, body = await app.post("/v1/completions", raw)
            return got_status, body, app.metrics

    with caplog.at_level(logging.INFO):
        got_status, body, metrics = asyncio.run(run())
    assert got_status == status, body
    error = body["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert len(error["message"]) < 400  # a huge value is not echoed back
    assert metrics.errors.samples() == {(("status", str(status)),): 1.0}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def _health_latencies(app: App, request: asyncio.Task) -> list[float]:
    """Seconds each /health took, polled back to back while `request` runs."""
    latencies = []
    while not request.done():
        started = time.monotonic()
        async with app.session.get(app.url("/health")) as response:
            assert response.status == 503  # answers: no worker is up
        latencies.append(time.monotonic() - started)
    return latencies


@pytest.mark.parametrize("num_chars, status, code", [
    (TEN_MB, 413, "request_too_large"),  # refused from Content-Length: never read or decoded
    (200_000, 400, "context_length_exceeded"),  # read, then refused before tokenizing
])
def test_big_prompt_is_refused_before_tokenizing_and_health_stays_fast(num_chars, status, code,
                                                                       tokenizer):
    async def run():
        async with App(tokenizer) as app:
            raw = _body(prompt="word " * (num_chars // 5))
            request = asyncio.create_task(app.post("/v1/completions", raw))
            latencies = await _health_latencies(app, request)
            return await request, latencies

    (got_status, body), latencies = asyncio.run(run())
    max_chars = MAX_MODEL_LEN * tokenizer.max_token_chars  # no longer prompt can fit
    assert got_status == status and body["error"]["code"] == code, body
    if status == 400:  # counted in characters: the tokenizer never saw it
        assert body["error"]["message"] == (f"the prompt has {num_chars} characters; this "
                                            f"server accepts at most {max_chars}")
    else:
        assert f"over {64 * 1024 + 12 * max_chars} bytes" in body["error"]["message"]
    assert latencies and max(latencies) < 0.1, latencies


def test_tokenizing_a_big_prompt_runs_off_the_event_loop(tokenizer):
    # 2 MB within the configured character limit: tokenized (about a second on CPU), then too
    # many tokens for the context. /health is polled all along.
    async def run():
        async with App(tokenizer, max_prompt_chars=4_000_000) as app:
            raw = json.dumps({"messages": [{"role": "user", "content": "word " * 400_000}]})
            started = time.monotonic()
            request = asyncio.create_task(app.post("/v1/chat/completions", raw.encode()))
            latencies = await _health_latencies(app, request)
            return await request, latencies, time.monotonic() - started

    (status, body), latencies, seconds = asyncio.run(run())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "the prompt has 4000" in body["error"]["message"]  # tokens, counted after tokenizing
    assert seconds > 0.5 and len(latencies) >= 5, (seconds, latencies)
    # Tokenizing on the loop would hold /health for the whole second. In a thread, the loop
    # waits only while the tokenizer holds the GIL (turning 400k ids into a list: ~30 ms alone
    # on the machine, more when other processes share its 2 cores).
    assert sorted(latencies)[len(latencies) // 2] < 0.02, latencies
    assert max(latencies) < 0.25, latencies


async def _raw_exchange(port: int, parts: list[bytes], wait_s: float) -> bytes:
    """Send `parts` on a raw connection, then read one response (b"" if the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for part in parts:
        writer.write(part)
        await writer.drain()

    async def response() -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head + await reader.readexactly(length)

    try:
        return await asyncio.wait_for(response(), wait_s)
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    finally:
        writer.close()


def test_slow_body_gets_408_and_slow_headers_are_cut():
    async def run():
        async with App(None, read_timeout_s=0.5) as app:
            started = time.monotonic()
            head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            slow_body = await _raw_exchange(app.port, [head, b'{"prompt": '], 5.0)
            body_s = time.monotonic() - started
            started = time.monotonic()
            slow_head = await _raw_exchange(app.port, [b"POST /v1/completions HTTP/1.1\r\nHo"],
                                            5.0)
            return slow_body, body_s, slow_head, time.monotonic() - started, app.metrics

    slow_body, body_s, slow_head, head_s, metrics = asyncio.run(run())
    assert slow_body.startswith(b"HTTP/1.1 408"), slow_body
    assert json.loads(slow_body.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert 0.5 <= body_s < 2.0
    assert slow_head == b"" and 0.5 <= head_s < 2.0  # closed without an answer
    assert metrics.errors.samples() == {(("status", "408"),): 1.0}


@pytest.mark.parametrize("handler_cancellation", [False, True])
def test_client_that_leaves_mid_body_is_a_disconnect_not_a_server_error(handler_cancellation,
                                                                        caplog):
    async def run():
        async with App(None, handler_cancellation) as app:
            head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            _, writer = await asyncio.open_connection("127.0.0.1", app.port)
            writer.write(head + b'{"prompt": ')
            await writer.drain()
            await asyncio.sleep(0.2)  # the handler is reading the body
            writer.transport.abort()
            deadline = time.monotonic() + 5
            while not app.metrics.client_disconnects.get() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return app.metrics

    with caplog.at_level(logging.INFO):
        metrics = asyncio.run(run())
    assert metrics.client_disconnects.get() == 1.0
    assert metrics.errors.samples() == {}
    disconnects = [r for r in caplog.records if "client disconnected" in r.getMessage()]
    assert [r.levelno for r in disconnects] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class SlowWorker(worker_pb2_grpc.WorkerServicer):
    """A real gRPC worker that streams one token every 50 ms until cancelled."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def Generate(self, request, context):
        try:
            for i in range(1000):
                yield worker_pb2.GenerateResponse(request_id=request.request_id, token_ids=[i],
                                                  text="a")
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def Stats(self, request, context):
        return worker_pb2.WorkerStats(model="m", page_size=4, num_pages_total=8, num_pages_free=8,
                                      max_model_len=MAX_MODEL_LEN, namespace=namespace_to_spec(NS))

    async def KvEvents(self, request, context):
        yield worker_pb2.KvEvent(seq=1, cleared=worker_pb2.AllCleared(epoch=1))
        await asyncio.Event().wait()


def test_client_that_leaves_mid_stream_is_a_disconnect_and_cancels_the_worker(caplog):
    async def run():
        worker = SlowWorker()
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        app = App(None, workers=(address,), health_interval_s=0.1)
        pool = app.router.pool
        await pool.start()
        try:
            while not pool.available():
                await asyncio.sleep(0.02)
            async with app:
                response = await app.session.post(app.url("/v1/completions"),
                                                  json={"prompt": [1, 2, 3], "stream": True,
                                                        "max_tokens": 1000})
                assert (await response.content.readline()).startswith(b"data: ")
                response.connection.transport.abort()  # the client leaves mid-stream
                response.release()
                await asyncio.wait_for(worker.cancelled.wait(), 5)
                deadline = time.monotonic() + 5
                while not app.metrics.client_disconnects.get() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
        finally:
            await pool.close()
            await server.stop(None)
        return app.metrics

    with caplog.at_level(logging.INFO):
        metrics = asyncio.run(run())
    assert metrics.client_disconnects.get() == 1.0 and metrics.errors.samples() == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
