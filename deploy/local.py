"""`kvmesh serve`: the whole stack on one machine (store, N workers, router) as child processes.

Embedded defaults: CPU + disk tiers in the store, no Redis, no Ray, no GPU. Each child is a plain
`kvmesh <role> --port 0 ...` and is waited for by its `kvmesh <role> listening on HOST:PORT`
line; then this prints `kvmesh serving on http://HOST:PORT` and serves until SIGINT/SIGTERM,
when every child is stopped (router first, store last). Workers are colocated (`--workers N`,
role both) or disaggregated (`--prefill-workers N --decode-workers M`: the router sends a long
prompt's prefill to a prefill worker and its decode to a decode worker, handed over through the
store). A part that fails to start stops the whole stack with a clear message; later, a dead
worker is left out while a worker that can finish requests (role both or decode) lives (the
router routes around it, and runs requests colocated when no prefill worker is left), and a
dead store or router stops the stack. Children die with this process even if it is killed
(PR_SET_PDEATHSIG), so nothing is orphaned.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from kvmesh.deploy.errors import InvalidSecrets, InvalidWorkerCounts, StartFailed
from kvmesh.deploy.internal_auth import (
    DeploymentSecrets,
    new_token,
    read_api_key_file,
    tenant_secret,
)
from kvmesh.deploy.local_children import Child, start, stop, wait_ready
from kvmesh.deploy.worker_plan import (
    DECODE_CAPABLE,
    cuda_devices,
    role_argv,
    router_worker_argv,
    worker_names,
    worker_roles,
)
from kvmesh.router.config import parse_api_keys
from kvmesh.router.errors import InvalidConfig

DEFAULT_DATA_DIR = "~/.cache/kvmesh/serve"
DEFAULT_STORE_CPU_BYTES = 1 << 30
START_TIMEOUT_S = 600.0


def register(subparsers: argparse._SubParsersAction) -> None:
    env = os.environ.get
    parser = subparsers.add_parser(
        "serve", help="run store + workers + router on this machine",
        description=__doc__.split("\n\n")[0] + " Environment: KVMESH_SERVE_{HOST, PORT, "
        "WORKERS, PREFILL_WORKERS, DECODE_WORKERS, DEVICE, MODEL, DATA_DIR, STORE_CPU_BYTES, "
        "ROUTER_PROCESSES, API_KEYS, API_KEY_FILE}, "
        "KVMESH_TENANT_SECRET. Every store and worker port requires a token made at start "
        "and binds 127.0.0.1; the tenant-salt secret is kept in DATA_DIR/tenant_secret "
        "unless KVMESH_TENANT_SECRET gives one.")
    parser.add_argument("--host", default=env("KVMESH_SERVE_HOST", "127.0.0.1"),
                        help="router HTTP host (children bind 127.0.0.1)")
    parser.add_argument("--port", type=int, default=_env_int("KVMESH_SERVE_PORT", 8000),
                        help="router HTTP port (0 = a free port)")
    parser.add_argument("--workers", type=int, default=_env_int("KVMESH_SERVE_WORKERS", None),
                        help="number of workers (default 1 on CPU, one per GPU on cuda); CPU "
                             "workers split this machine's cores between them (torch threads "
                             "= cores // workers)")
    for role in ("prefill", "decode"):
        parser.add_argument(
            f"--{role}-workers", type=int,
            default=_env_int(f"KVMESH_SERVE_{role.upper()}_WORKERS", 0),
            help="prefill/decode disaggregation (give both, not --workers): workers started "
                 f"with --role {role}; on cuda all workers take the GPUs in turn, and workers "
                 "sharing a GPU split its memory (--gpu-memory-utilization)")
    parser.add_argument("--device", default=env("KVMESH_SERVE_DEVICE", "cpu"),
                        choices=("cpu", "cuda"))
    parser.add_argument("--model", default=env("KVMESH_SERVE_MODEL", "smollm2"),
                        help='"smollm2" (bundled), a Hugging Face folder or a .gguf file')
    parser.add_argument("--data-dir", default=env("KVMESH_SERVE_DATA_DIR", DEFAULT_DATA_DIR),
                        help="the store's disk tier lives in DATA_DIR/store")
    parser.add_argument("--store-cpu-bytes", type=int,
                        default=_env_int("KVMESH_SERVE_STORE_CPU_BYTES", DEFAULT_STORE_CPU_BYTES),
                        help="capacity of the store's CPU tier in bytes (default 1 GiB)")
    parser.add_argument("--router-processes", default=env("KVMESH_SERVE_ROUTER_PROCESSES"),
                        metavar="N|auto",
                        help="the router's HTTP serving processes on its one port (kvmesh "
                             "router --processes; default 1; auto: cores // 4, between 1 and 4)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY[=TENANT]",
                        help="router API key (repeat); none = no auth. Prefer "
                             "KVMESH_SERVE_API_KEYS or --api-key-file: argv is visible to "
                             "every local user")
    parser.add_argument("--api-key-file", default=env("KVMESH_SERVE_API_KEY_FILE"),
                        help="file of router API keys, one KEY[=TENANT] a line")
    parser.add_argument("--start-timeout", type=float, default=START_TIMEOUT_S,
                        help="seconds each part may take to start listening")
    for role in ("store", "worker", "router"):
        parser.add_argument(f"--{role}-arg", action="append", default=[], metavar="ARG",
                            help=f"extra argument for every `kvmesh {role}` (repeat)")
    parser.set_defaults(func=run)


def _env_int(name: str, default: int | None) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"kvmesh serve: {name} must be an integer, got {text!r}") from None


def _supervise(store: Child, workers: list[Child], router: Child, finishers: list[Child],
               stop_requested: threading.Event) -> int:
    """Serve until asked to stop (0). A dead worker is left out (the router routes around it)
    while one of `finishers` (the workers that can finish a request: role both or decode)
    lives; the store, the router or the last finisher dying stops the stack (1)."""
    lost: set[str] = set()
    while not stop_requested.wait(0.5):
        for child in (store, router, *workers):
            code = child.process.poll()
            if code is None or child.name in lost:
                continue
            lost.add(child.name)
            alive = [w for w in workers if w.process.poll() is None]
            if child in workers and any(w.process.poll() is None for w in finishers):
                print(f"kvmesh serve: {child.name} exited with code {code}; serving with "
                      f"{len(alive)} worker(s)", file=sys.stderr, flush=True)
                continue
            print(f"kvmesh serve: {child.name} exited with code {code}; stopping the stack",
                  file=sys.stderr, flush=True)
            return 1
    print("kvmesh serve: shutting down", file=sys.stderr, flush=True)
    return 0


def _num_gpus(device: str) -> int:
    if device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def _placements(device: str, num_workers: int) -> list[list[str]]:
    """Each worker's device flags. CPU workers split the cores: each with torch's default (one
    thread a core) would oversubscribe them, and two busy workers on 2 cores fell from 48 to
    2.6 tok/s. GPUs are taken in turn; workers on one GPU split its memory."""
    if device == "cpu":
        threads = max(1, len(os.sched_getaffinity(0)) // num_workers)
        return [["--device", "cpu", "--torch-threads", str(threads)]] * num_workers
    return [["--device", f"cuda:{index}",
             *([] if share is None else ["--gpu-memory-utilization", str(share)])]
            for index, share in cuda_devices(num_workers, _num_gpus(device))]


def _secrets(args: argparse.Namespace, data_dir: Path) -> DeploymentSecrets:
    items = [*args.api_key, os.environ.get("KVMESH_SERVE_API_KEYS", "")]
    if args.api_key_file:
        items += read_api_key_file(args.api_key_file)
    return DeploymentSecrets(new_token(), tenant_secret(data_dir), parse_api_keys(items))


def run(args: argparse.Namespace) -> int:
    try:
        roles = worker_roles(args.workers, args.prefill_workers, args.decode_workers,
                             default_workers=max(1, _num_gpus(args.device)))
    except InvalidWorkerCounts as exc:
        print(f"kvmesh serve: {exc}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).expanduser()
    (data_dir / "store").mkdir(parents=True, exist_ok=True)
    try:
        auth = _secrets(args, data_dir)
    except (InvalidSecrets, InvalidConfig) as exc:
        print(f"kvmesh serve: {exc}", file=sys.stderr)
        return 2
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())

    children: list[Child] = []
    try:
        store = start("store", ["store", "--port", "0", "--cpu-bytes",
                                str(args.store_cpu_bytes), "--disk-dir",
                                str(data_dir / "store"), *args.store_arg], auth.store_env())
        children.append(store)
        wait_ready([store], args.start_timeout, stop_requested)
        workers = [
            start(name, ["worker", "--port", "0", "--model", args.model, *placement,
                         "--store", str(store.address), *role_argv(role), *args.worker_arg],
                  auth.worker_env())
            for name, role, placement in zip(worker_names(roles), roles,
                                             _placements(args.device, len(roles)), strict=True)]
        children.extend(workers)
        wait_ready(workers, args.start_timeout, stop_requested)
        router_argv = ["router", "--host", args.host, "--port", str(args.port),
                       "--store", str(store.address),
                       *router_worker_argv(roles, [str(w.address) for w in workers])]
        if args.model != "smollm2":  # the router tokenizes with the bundled model by default
            router_argv += ["--model", args.model]
        if args.router_processes is not None:
            router_argv += ["--processes", args.router_processes]
        router = start("router", [*router_argv, *args.router_arg], auth.router_env())
        children.append(router)
        wait_ready([router], args.start_timeout, stop_requested)
        print(f"kvmesh serving on http://{router.address}", flush=True)
        finishers = [w for w, role in zip(workers, roles, strict=True) if role in DECODE_CAPABLE]
        return _supervise(store, workers, router, finishers, stop_requested)
    except StartFailed as exc:
        print(f"kvmesh serve: {exc}; stopping the stack", file=sys.stderr, flush=True)
        return 1
    finally:
        stop(list(reversed(children)))
