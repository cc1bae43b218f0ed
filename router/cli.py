"""`kvmesh router`: run the router alone against running workers (and optionally a store)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from aiohttp import web

from kvmesh.router.config import RouterConfig, add_arguments, config_from_args
from kvmesh.router.errors import InvalidConfig

READY_TIMEOUT_S = 120.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("router", help="cache-aware OpenAI-compatible router")
    add_arguments(parser)
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                        help="seconds to wait for a first worker before listening anyway")
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except InvalidConfig as exc:
        print(f"kvmesh router: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config, args.ready_timeout))
    return 0


async def start_router(config: RouterConfig, ready_timeout: float = READY_TIMEOUT_S):
    """Build and start every part; returns (runner, router, (host, port)). Caller cleans up
    with `stop_router(runner, router)`."""
    from kvmesh.router.http.app import build_app
    from kvmesh.router.metrics import RouterMetrics
    from kvmesh.router.routing.index import PrefixIndex
    from kvmesh.router.routing.pool import WorkerPool
    from kvmesh.router.routing.store_probe import StoreProbe
    from kvmesh.router.service import Router
    from kvmesh.router.tokenizer import PromptTokenizer

    tokenizer = await asyncio.to_thread(PromptTokenizer, config.model_path,
                                        config.split_special_tokens)
    index = PrefixIndex(config.predicted_ttl_s)
    metrics = RouterMetrics()
    pool = WorkerPool(config, index, metrics)
    await pool.start()
    store = StoreProbe(config.store, config.worker_token, metrics) if config.store else None
    router = Router(config, tokenizer, pool, index, metrics, store)
    if not await pool.wait_ready(ready_timeout):
        logging.getLogger(__name__).warning("no worker ready after %.0fs", ready_timeout)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels the
    # worker's Generate call, so a departed client's generation stops (streamed or not).
    runner = web.AppRunner(build_app(router), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    gc.collect()
    gc.freeze()  # startup objects (tokenizer, model tables) leave the GC's scans
    host, port = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
    return runner, router, (host, port)


async def stop_router(runner: web.AppRunner, router) -> None:
    await runner.cleanup()
    await router.pool.close()
    if router.store is not None:
        await router.store.close()


async def serve(config: RouterConfig, ready_timeout: float = READY_TIMEOUT_S) -> None:
    runner, router, (host, port) = await start_router(config, ready_timeout)
    print(f"kvmesh router listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await stop_router(runner, router)
