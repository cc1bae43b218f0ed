"""`kvmesh serve`: the whole stack on one machine (store, N workers, router) as child processes.

Embedded defaults: CPU + disk tiers in the store, no Redis, no Ray, no GPU. Each child is a plain
`kvmesh <role> --port 0 ...` and is waited for by its `kvmesh <role> listening on HOST:PORT`
line; then this prints `kvmesh serving on http://HOST:PORT` and serves until SIGINT/SIGTERM,
when every child is stopped (router first, store last). A part that fails to start stops the
whole stack with a clear message; later, a dead worker is left out while others live (the
router routes around it), and a dead store or router stops the stack. Children die with this
process even if it is killed (PR_SET_PDEATHSIG), so nothing is orphaned.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.deploy.cli import command
from kvmesh.deploy.errors import InvalidSecrets, StartFailed
from kvmesh.deploy.internal_auth import (
    DeploymentSecrets,
    new_token,
    read_api_key_file,
    tenant_secret,
)
from kvmesh.router.config import parse_api_keys
from kvmesh.router.errors import InvalidConfig

_LISTENING = re.compile(r"^kvmesh (\w+) listening on (\S+)\s*$")
_PR_SET_PDEATHSIG = 1
DEFAULT_DATA_DIR = "~/.cache/kvmesh/serve"
DEFAULT_STORE_CPU_BYTES = 1 << 30
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 15.0
# the store copies its CPU tier to disk when stopped, for at most its --flush-s (default 20 s)
STORE_STOP_TIMEOUT_S = 30.0


def register(subparsers: argparse._SubParsersAction) -> None:
    env = os.environ.get
    parser = subparsers.add_parser(
        "serve", help="run store + workers + router on this machine",
        description=__doc__.split("\n\n")[0] + " Environment: KVMESH_SERVE_{HOST, PORT, "
        "WORKERS, DEVICE, MODEL, DATA_DIR, STORE_CPU_BYTES, API_KEYS, API_KEY_FILE}, "
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
    parser.add_argument("--device", default=env("KVMESH_SERVE_DEVICE", "cpu"),
                        choices=("cpu", "cuda"))
    parser.add_argument("--model", default=env("KVMESH_SERVE_MODEL", "smollm2"),
                        help='"smollm2" (bundled), a Hugging Face folder or a .gguf file')
    parser.add_argument("--data-dir", default=env("KVMESH_SERVE_DATA_DIR", DEFAULT_DATA_DIR),
                        help="the store's disk tier lives in DATA_DIR/store")
    parser.add_argument("--store-cpu-bytes", type=int,
                        default=_env_int("KVMESH_SERVE_STORE_CPU_BYTES", DEFAULT_STORE_CPU_BYTES),
                        help="capacity of the store's CPU tier in bytes (default 1 GiB)")
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


@dataclass
class Child:
    """One started part. `address` is set once it printed its listening line."""

    name: str
    process: subprocess.Popen
    address: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when this process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(name: str, argv: list[str], env: dict[str, str]) -> Child:
    """Start `kvmesh ...` with stdout piped (its listening line), stderr inherited, and `env`
    (its secrets) added to ours. A thread reads stdout: it records the address, then forwards
    every line to our stderr."""
    process = subprocess.Popen(
        command(*argv),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, bufsize=1,
        preexec_fn=_die_with_parent, env={**os.environ, **env},
    )
    child = Child(name, process)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            match = _LISTENING.match(line)
            if match and not child.ready.is_set():
                child.address = match.group(2)
                child.ready.set()
            else:
                sys.stderr.write(f"[{name}] {line}")
        child.ready.set()  # exited: wake the waiter, which sees no address

    threading.Thread(target=pump, name=f"pump-{name}", daemon=True).start()
    return child


def _wait_ready(children: list[Child], timeout: float, interrupted: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        while not child.ready.wait(0.2):
            if interrupted.is_set():
                raise StartFailed("interrupted while starting")
            if time.monotonic() > deadline:
                raise StartFailed(f"{child.name} did not start listening within {timeout:.0f} s")
        if child.address is None:
            code = child.process.wait()
            raise StartFailed(f"{child.name} exited with code {code} before it was ready "
                              "(its error is above)")


def _stop(children: list[Child]) -> None:
    """SIGTERM each child (in the given order), then SIGKILL whatever outlives STOP_TIMEOUT_S."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
        try:
            child.process.wait(STORE_STOP_TIMEOUT_S if child.name == "store" else STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"kvmesh serve: {child.name} ignored SIGTERM; killing it", file=sys.stderr)
            child.process.kill()
            child.process.wait()


def _supervise(store: Child, workers: list[Child], router: Child,
               stop_requested: threading.Event) -> int:
    """Serve until asked to stop (0). A dead worker is left out (the router routes around it)
    while another one lives; the store, the router or the last worker dying stops the stack (1)."""
    lost: set[str] = set()
    while not stop_requested.wait(0.5):
        for child in (store, router, *workers):
            code = child.process.poll()
            if code is None or child.name in lost:
                continue
            lost.add(child.name)
            alive = [w for w in workers if w.process.poll() is None]
            if child in workers and alive:
                print(f"kvmesh serve: {child.name} exited with code {code}; serving with "
                      f"{len(alive)} worker(s)", file=sys.stderr, flush=True)
                continue
            print(f"kvmesh serve: {child.name} exited with code {code}; stopping the stack",
                  file=sys.stderr, flush=True)
            return 1
    print("kvmesh serve: shutting down", file=sys.stderr, flush=True)
    return 0


def _num_workers(args: argparse.Namespace) -> int:
    if args.workers is not None:
        return args.workers
    if args.device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def _secrets(args: argparse.Namespace, data_dir: Path) -> DeploymentSecrets:
    items = [*args.api_key, os.environ.get("KVMESH_SERVE_API_KEYS", "")]
    if args.api_key_file:
        items += read_api_key_file(args.api_key_file)
    return DeploymentSecrets(new_token(), tenant_secret(data_dir), parse_api_keys(items))


def run(args: argparse.Namespace) -> int:
    num_workers = _num_workers(args)
    if num_workers < 1:
        print("kvmesh serve: --workers must be >= 1", file=sys.stderr)
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
        store = _start("store", ["store", "--port", "0", "--cpu-bytes",
                                 str(args.store_cpu_bytes), "--disk-dir",
                                 str(data_dir / "store"), *args.store_arg], auth.store_env())
        children.append(store)
        _wait_ready([store], args.start_timeout, stop_requested)
        workers = []
        # CPU workers split the cores: each with torch's default (one thread a core) would
        # oversubscribe them, and two busy workers on 2 cores fell from 48 to 2.6 tok/s
        share = ["--torch-threads", str(max(1, len(os.sched_getaffinity(0)) // num_workers))]
        for i in range(num_workers):
            device = f"cuda:{i}" if args.device == "cuda" else "cpu"
            workers.append(_start(f"worker {i}", [
                "worker", "--port", "0", "--model", args.model, "--device", device,
                "--store", str(store.address), *(share if device == "cpu" else []),
                *args.worker_arg], auth.worker_env()))
        children.extend(workers)
        _wait_ready(workers, args.start_timeout, stop_requested)
        router_argv = ["router", "--host", args.host, "--port", str(args.port),
                       "--store", str(store.address)]
        for worker in workers:
            router_argv += ["--worker", str(worker.address)]
        if args.model != "smollm2":  # the router tokenizes with the bundled model by default
            router_argv += ["--model", args.model]
        router = _start("router", [*router_argv, *args.router_arg], auth.router_env())
        children.append(router)
        _wait_ready([router], args.start_timeout, stop_requested)
        print(f"kvmesh serving on http://{router.address}", flush=True)
        return _supervise(store, workers, router, stop_requested)
    except StartFailed as exc:
        print(f"kvmesh serve: {exc}; stopping the stack", file=sys.stderr, flush=True)
        return 1
    finally:
        _stop(list(reversed(children)))
