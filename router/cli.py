"""`kvmesh router`: run the router alone against running workers (and optionally a store).

With `--processes N` (N > 1) this process supervises N serving processes on one port
(router/processes.py); each runs this module (`python -m kvmesh.router.cli`) as a plain
one-process router that binds with SO_REUSEPORT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from aiohttp import web

from kvmesh.router.config import RouterConfig, add_arguments, config_from_args
from kvmesh.router.errors import InvalidConfig

READY_TIMEOUT_S = 120.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("router", help="cache-aware OpenAI-compatible router")
    _add_all_arguments(parser)


def _add_all_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                        help="seconds to wait for a first worker before listening anyway")
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(func=handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m kvmesh.router.cli`: how a multi-process router starts its serving processes."""
    parser = argparse.ArgumentParser(prog="kvmesh router")
    _add_all_arguments(parser)
    return handler(parser.parse_args(argv))


def handler(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except InvalidConfig as exc:
        print(f"kvmesh router: {exc}", file=sys.stderr)
        return 2
    if config.num_processes > 1:
        from kvmesh.router.processes import run_processes

        return run_processes(config, args.ready_timeout, args.log_level)
    from kvmesh.router.processes import PROCESS_INDEX_ENV

    index = os.environ.get(PROCESS_INDEX_ENV)  # set when this serves under a parent
    asyncio.run(serve(config, args.ready_timeout, None if index is None else int(index)))
    return 0


async def start_router(config: RouterConfig, ready_timeout: float = READY_TIMEOUT_S,
                       process_index: int | None = None):
    """Build and start every part; returns (runner, router, (host, port)). Caller cleans up
    with `stop_router(runner, router)`. `process_index`: this is one of a multi-process
    router's serving processes: bind with SO_REUSEPORT, and tag each response with the index."""
    from kvmesh.router.http.app import build_app
    from kvmesh.router.metrics import RouterMetrics
    from kvmesh.router.processes import PROCESS_HEADER
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
        logging.getLogger("kvmesh.router.cli").warning("no worker ready after %.0fs", ready_timeout)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels the
    # worker's Generate call, so a departed client's generation stops (streamed or not).
    app = build_app(router)
    if process_index is not None:
        tag = str(process_index)

        async def tag_response(request: web.Request, response: web.StreamResponse) -> None:
            response.headers[PROCESS_HEADER] = tag

        app.on_response_prepare.append(tag_response)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_port=process_index is not None)
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


async def serve(config: RouterConfig, ready_timeout: float = READY_TIMEOUT_S,
                process_index: int | None = None) -> None:
    runner, router, (host, port) = await start_router(config, ready_timeout, process_index)
    print(f"kvmesh router listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await stop_router(runner, router)


if __name__ == "__main__":
    sys.exit(main())
