"""OpenAI-compatible HTTP front (aiohttp): auth, JSON/SSE, errors. Logic lives in service.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

import prometheus_client
from aiohttp import web

from kvmesh.router.errors import (
    InvalidRequest,
    NotFound,
    RequestTimeout,
    RequestTooLarge,
    RouterError,
    Unauthenticated,
    error_body,
    http_status,
)
from kvmesh.router.http.protocol import check_prompt_size, parse_request
from kvmesh.router.http.responses import StreamFormatter, full_response, sse_event
from kvmesh.router.requests import Chunk, ParsedRequest, Prepared
from kvmesh.router.service import Router

log = logging.getLogger(__name__)
ROUTER_KEY = web.AppKey("router", Router)
# Tokenizing and chat templating take seconds on a large prompt; they run here, off the loop.
TOKENIZER_POOL_KEY = web.AppKey("tokenizer_pool", ThreadPoolExecutor)
TENANT_KEY = web.RequestKey("tenant", str)
WORKER_HEADER = "x-kvmesh-worker"
OPEN_PATHS = ("/health", "/metrics")
BODY_OVERHEAD_NBYTES = 64 << 10  # a body's fields besides the prompt text


def _error_response(router: Router, error: RouterError) -> web.Response:
    status, _ = http_status(error)
    router.metrics.errors.inc(status=str(status))
    return web.json_response(error_body(error), status=status)


def _tenant(request: web.Request, router: Router) -> str:
    """The caller's tenant from `Authorization: Bearer KEY`; '' when auth is off."""
    keys = router.config.api_keys
    if not keys:
        return ""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    tenant = keys.get(key.strip()) if scheme.lower() == "bearer" else None
    if tenant is None:
        raise Unauthenticated("missing or invalid API key; send 'Authorization: Bearer KEY'")
    return tenant


def _client_left(request: web.Request, router: Router) -> None:
    log.info("client disconnected from %s %s", request.method, request.path)
    router.metrics.client_disconnects.inc()


@web.middleware
async def errors_middleware(request: web.Request, handler):
    router = request.app[ROUTER_KEY]
    try:
        if request.path not in OPEN_PATHS:
            request[TENANT_KEY] = _tenant(request, router)
        return await handler(request)
    except RouterError as exc:
        return _error_response(router, exc)
    except ConnectionResetError:  # the client left; nothing to answer and not our failure
        _client_left(request, router)
        return web.Response(status=499)  # nginx's "client closed request"; never reaches it
    except asyncio.CancelledError:  # with handler_cancellation, a client that left cancels us
        if request.transport is None or request.transport.is_closing():
            _client_left(request, router)
        raise
    except web.HTTPNotFound:
        return _error_response(router, NotFound(f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        error = InvalidRequest(f"method {request.method} not allowed on {request.path}")
        return _error_response(router, error)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error on %s", request.path)
        return _error_response(router, RouterError("internal error"))


def _decode_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except ValueError as exc:  # bad JSON or UTF-8, or an integer of over 4,300 digits
        raise InvalidRequest(f"request body is not valid JSON: {str(exc)[:200]}") from None


async def _read_json(request: web.Request) -> object:
    """The decoded body. RequestTooLarge over `_max_body_bytes` (from Content-Length before
    reading anything); RequestTimeout if the body comes in slower than read_timeout_s."""
    router = request.app[ROUTER_KEY]
    limit = _max_body_bytes(router)
    too_large = RequestTooLarge(f"request body is over {limit} bytes, more than any prompt this "
                                f"server accepts needs")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(router.config.read_timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within "
                             f"{router.config.read_timeout_s:g}s") from None
    # json.loads holds the GIL (a thread would not free the loop): the size limit bounds it.
    return _decode_json(b"".join(chunks))


def _max_prompt_chars(router: Router) -> int | None:
    """Characters a prompt may have: configured, or what can fit the context; None if unknown."""
    if router.config.max_prompt_chars:
        return router.config.max_prompt_chars
    max_token_chars = getattr(router.tokenizer, "max_token_chars", None)
    max_model_len = router.max_model_len
    if max_token_chars is None or max_model_len is None:
        return None
    return max_model_len * max_token_chars


def _max_body_bytes(router: Router) -> int:
    """max_body_bytes, or less: the JSON of the longest prompt accepted (12 bytes a character
    at worst, as an escaped surrogate pair) and the other fields. Decoding 10 MB of JSON holds
    the event loop for ~0.1 s, a list of a million token ids for ~0.7 s."""
    max_chars = _max_prompt_chars(router)
    if max_chars is None:
        return router.config.max_body_bytes
    return min(router.config.max_body_bytes, BODY_OVERHEAD_NBYTES + 12 * max_chars)


async def _prepare(request: web.Request, parsed: ParsedRequest):
    """Size check on the loop, then tokenizing (and templating) in the tokenizer pool."""
    router = request.app[ROUTER_KEY]
    check_prompt_size(parsed, _max_prompt_chars(router))
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[TOKENIZER_POOL_KEY], router.prepare, parsed,
                                      request[TENANT_KEY])


async def _completion(request: web.Request, *, is_chat: bool) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    parsed = parse_request(await _read_json(request), is_chat=is_chat)
    prep = await _prepare(request, parsed)
    model = router.model_name
    # aclosing: however the handler ends (a client that left cancels it, a failed write), the
    # generator closes now, and with it the worker's Generate call, not when the GC gets to it.
    if not parsed.stream:
        async with contextlib.aclosing(router.run(prep, buffered=True)) as chunks:
            collected = [chunk async for chunk in chunks]
        worker = collected[-1].worker_id if collected else ""
        return web.json_response(full_response(prep, model, collected),
                                 headers={WORKER_HEADER: worker})
    async with contextlib.aclosing(router.run(prep)) as chunks:
        return await _stream(request, prep, chunks)


async def _stream(request: web.Request, prep: Prepared, chunks: AsyncGenerator[Chunk, None]
                  ) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    # Wait for the first chunk before sending headers: until then, failures are plain errors.
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        WORKER_HEADER: first.worker_id if first else ""})
    await response.prepare(request)
    formatter = StreamFormatter(prep, router.model_name)
    # one write per chunk: each is a socket send (a syscall) while the client keeps up
    try:
        if first is not None:
            if data := formatter.sse(first):  # never b"": that would end the chunked body
                await response.write(data)
            async for chunk in chunks:
                if data := formatter.sse(chunk):
                    await response.write(data)
        await response.write(formatter.final_sse())
    except RouterError as exc:  # headers are out: report in-band, as OpenAI-style servers do
        status, _ = http_status(exc)
        router.metrics.errors.inc(status=str(status))
        await response.write(sse_event(error_body(exc)) + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, is_chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, is_chat=True)


async def models(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    card = {"id": router.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "kvmesh", "max_model_len": router.max_model_len}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    serving = router.pool.available()  # whole requests (and the rest after a prefill)
    available = {h.worker_id for h in serving + router.pool.available("prefill")}
    workers = {w: (w in available) for w in router.pool.workers}
    status = 200 if serving else 503
    return web.json_response({"status": "ok" if serving else "unavailable",
                              "workers": workers}, status=status)


async def metrics(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    router.metrics.index_pages.set(router.index.num_pages())
    for worker_id in router.index.worker_ids:
        router.metrics.index_worker_pages.set(router.index.num_pages(worker_id), worker=worker_id)
    return web.Response(body=router.metrics.render(),
                        headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


async def _close_tokenizer_pool(app: web.Application) -> None:
    app[TOKENIZER_POOL_KEY].shutdown(wait=False, cancel_futures=True)


def build_app(router: Router) -> web.Application:
    config = router.config
    # keepalive_timeout also bounds how long a new connection may take to send its headers
    # (aiohttp arms it on connect and until a whole request has arrived): slow headers get cut.
    app = web.Application(middlewares=[errors_middleware], client_max_size=config.max_body_bytes,
                          handler_args={"keepalive_timeout": config.read_timeout_s})
    app[ROUTER_KEY] = router
    app[TOKENIZER_POOL_KEY] = ThreadPoolExecutor(config.num_tokenizer_threads,
                                                 thread_name_prefix="kvmesh-tokenize")
    app.on_cleanup.append(_close_tokenizer_pool)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
