"""OpenAI-compatible HTTP front (aiohttp): auth, JSON/SSE, errors. Logic lives in service.py."""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from kvmesh.router.errors import (
    InvalidRequest,
    NotFound,
    RouterError,
    Unauthenticated,
    error_body,
    http_status,
)
from kvmesh.router.protocol import parse_request
from kvmesh.router.responses import StreamFormatter, full_response
from kvmesh.router.service import Router

log = logging.getLogger(__name__)
ROUTER_KEY = web.AppKey("router", Router)
TENANT_KEY = web.RequestKey("tenant", str)
WORKER_HEADER = "x-kvmesh-worker"
OPEN_PATHS = ("/health", "/metrics")


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


@web.middleware
async def errors_middleware(request: web.Request, handler):
    router = request.app[ROUTER_KEY]
    try:
        if request.path not in OPEN_PATHS:
            request[TENANT_KEY] = _tenant(request, router)
        return await handler(request)
    except RouterError as exc:
        return _error_response(router, exc)
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


async def _completion(request: web.Request, *, is_chat: bool) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    parsed = parse_request(body, is_chat=is_chat)
    prep = router.prepare(parsed, request[TENANT_KEY])
    model = router.model_name
    if not parsed.stream:
        collected = [chunk async for chunk in router.run(prep, buffered=True)]
        worker = collected[-1].worker_id if collected else ""
        return web.json_response(full_response(prep, model, collected),
                                 headers={WORKER_HEADER: worker})
    # Wait for the first chunk before sending headers: until then, failures are plain errors.
    chunks = router.run(prep)
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        WORKER_HEADER: first.worker_id if first else ""})
    await response.prepare(request)
    formatter = StreamFormatter(prep, model)

    async def send(payload: dict) -> None:
        await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    try:
        if first is not None:
            for event in formatter.events(first):
                await send(event)
            async for chunk in chunks:
                for event in formatter.events(chunk):
                    await send(event)
        for event in formatter.final_events():
            await send(event)
    except RouterError as exc:  # headers are out: report in-band, as OpenAI-style servers do
        status, _ = http_status(exc)
        router.metrics.errors.inc(status=str(status))
        await send(error_body(exc))
    finally:
        await chunks.aclose()  # a client that left cancels the worker's generation
    await response.write(b"data: [DONE]\n\n")
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
    available = {h.worker_id for h in router.pool.available()}
    workers = {w: (w in available) for w in router.pool.workers}
    status = 200 if available else 503
    return web.json_response({"status": "ok" if available else "unavailable",
                              "workers": workers}, status=status)


async def metrics(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    router.metrics.index_pages.set(router.index.num_pages())
    for worker_id in router.index.worker_ids:
        router.metrics.index_worker_pages.set(router.index.num_pages(worker_id), worker=worker_id)
    return web.Response(text=router.metrics.render(), content_type="text/plain",
                        headers={"X-Content-Type": "version=0.0.4"})


def build_app(router: Router) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=16 << 20)
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
