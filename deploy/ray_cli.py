"""`kvmesh ray deploy|status|down`: the kvmesh stack on a Ray cluster (see deploy/ray_stack.py).

Flag defaults come from `KVMESH_RAY_*` environment variables (e.g. KVMESH_RAY_WORKERS=4); the
cluster address from --address, else RAY_ADDRESS, else "auto" (the local node's cluster).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING

from kvmesh.deploy.errors import DeployError, RayConfigError
from kvmesh.deploy.ray_config import NAMESPACE, RayDeployConfig

if TYPE_CHECKING:
    from kvmesh.deploy.ray_stack import StackStatus


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"KVMESH_RAY_{name}", default)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"),
                        help="Ray cluster address (host:port, ray://host:port or auto)")
    parser.add_argument("--namespace", default=_env("NAMESPACE", NAMESPACE),
                        help="Ray namespace of the kvmesh actors")


def register(subparsers: argparse._SubParsersAction) -> None:
    # string defaults from the environment go through each flag's `type`, so a bad
    # KVMESH_RAY_* value is reported like a bad flag
    parser = subparsers.add_parser("ray", help="run kvmesh on a Ray cluster")
    actions = parser.add_subparsers(dest="ray_command", metavar="ACTION", required=True)

    dep = actions.add_parser("deploy", help="start store, workers and router as Ray actors")
    _add_connection_flags(dep)
    dep.add_argument("--workers", type=int, default=_env("WORKERS", None),
                     help="colocated workers (default 1)")
    for role in ("prefill", "decode"):
        dep.add_argument(f"--{role}-workers", type=int,
                         default=_env(f"{role.upper()}_WORKERS", "0"),
                         help="prefill/decode disaggregation (give both, not --workers): "
                              f"workers run with --role {role} (worker ports count the "
                              "prefill workers first); --num-gpus-per-worker 0.5 lets a "
                              "prefill and a decode worker share a GPU, half its memory each")
    dep.add_argument("--num-cpus-per-worker", type=float,
                     default=_env("NUM_CPUS_PER_WORKER", "1"))
    dep.add_argument("--num-gpus-per-worker", type=float,
                     default=_env("NUM_GPUS_PER_WORKER", "0"),
                     help="1 on a GPU cluster (one worker per GPU, --device cuda); 0: CPU workers")
    dep.add_argument("--model", default=_env("MODEL", None),
                     help="model path (HF folder or .gguf); default: the worker's default")
    dep.add_argument("--redis-url", default=_env("REDIS_URL", None),
                     help="shared tier behind the store (redis:// or a Redis Cluster node)")
    dep.add_argument("--port", type=int, default=_env("PORT", "8000"),
                     help="router HTTP port")
    dep.add_argument("--router-processes", default=_env("ROUTER_PROCESSES", None),
                     metavar="N|auto",
                     help="the router's HTTP serving processes on its port (kvmesh router "
                          "--processes; default 1; auto: the head node's cores // 4, 1 to 4)")
    dep.add_argument("--store-port", type=int, default=_env("STORE_PORT", "50051"))
    dep.add_argument("--worker-port", type=int, default=_env("WORKER_PORT", "50100"),
                     help="worker i listens on this port + i")
    dep.add_argument("--store-cpu-bytes", type=int, default=None)
    dep.add_argument("--store-disk-dir", default=_env("STORE_DISK_DIR", None))
    dep.add_argument("--host-tier-bytes", type=int, default=None,
                     help="each worker's host CPU tier (on its node) that evicted pages demote to")
    dep.add_argument("--api-key", default=_env("API_KEY", None))
    dep.add_argument("--token", default=_env("TOKEN", None),
                     help="bearer token between router, workers and store")
    dep.add_argument("--max-restarts", type=int, default=_env("MAX_RESTARTS", "5"))
    dep.add_argument("--timeout", type=float, default=600.0,
                     help="seconds to wait for each role to listen")
    for role in ("store", "worker", "router"):
        dep.add_argument(f"--{role}-args", default="",
                         help=f"extra flags for `kvmesh {role}`, one shell-quoted string "
                              f"(--{role}-args='--flag value')")
    dep.set_defaults(func=_deploy)

    stat = actions.add_parser("status", help="list the kvmesh actors and their addresses")
    _add_connection_flags(stat)
    stat.set_defaults(func=_status)

    down = actions.add_parser("down", help="stop every kvmesh actor")
    _add_connection_flags(down)
    down.set_defaults(func=_down)


def _config(args: argparse.Namespace) -> RayDeployConfig:
    return RayDeployConfig(
        address=args.address, namespace=args.namespace, num_workers=args.workers,
        num_prefill_workers=args.prefill_workers, num_decode_workers=args.decode_workers,
        num_cpus_per_worker=args.num_cpus_per_worker,
        num_gpus_per_worker=args.num_gpus_per_worker, model=args.model,
        redis_url=args.redis_url, store_port=args.store_port, worker_base_port=args.worker_port,
        router_port=args.port, router_processes=args.router_processes,
        store_cpu_bytes=args.store_cpu_bytes,
        store_disk_dir=args.store_disk_dir, worker_host_tier_bytes=args.host_tier_bytes,
        api_key=args.api_key, token=args.token,
        max_restarts=args.max_restarts, ready_timeout_s=args.timeout,
        store_args=tuple(shlex.split(args.store_args)),
        worker_args=tuple(shlex.split(args.worker_args)),
        router_args=tuple(shlex.split(args.router_args)))


def _print_status(stack: StackStatus) -> None:
    for name, info in sorted(stack.infos.items()):
        restarted = " (restarted)" if info.is_restarted else ""
        print(f"{name:<24} {info.role:<7} {info.address:<22} node {info.node_ip} "
              f"pid {info.child_pid}{restarted}")
    for name in stack.unavailable:
        print(f"{name:<24} unavailable (restarting or dead)")


def _deploy(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except RayConfigError as exc:
        print(f"kvmesh ray deploy: {exc}", file=sys.stderr)
        return 2
    from kvmesh.deploy import ray_stack  # imports ray

    try:
        stack = ray_stack.deploy(config)
    except DeployError as exc:
        print(f"kvmesh ray deploy: {exc}", file=sys.stderr)
        return 1
    _print_status(stack)
    print(f"kvmesh serving on {stack.router_url}", flush=True)
    return 0


def _connect(args: argparse.Namespace, action: str) -> bool:
    from kvmesh.deploy import ray_stack

    try:
        ray_stack.connect(args.address, args.namespace)
    except DeployError as exc:
        print(f"kvmesh ray {action}: {exc}", file=sys.stderr)
        return False
    return True


def _status(args: argparse.Namespace) -> int:
    from kvmesh.deploy import ray_stack

    if not _connect(args, "status"):
        return 1
    stack = ray_stack.status()
    if not stack.infos and not stack.unavailable:
        print(f"kvmesh is not deployed in namespace {args.namespace!r}")
        return 1
    _print_status(stack)
    if stack.router_url:
        print(f"kvmesh serving on {stack.router_url}")
    return 0 if not stack.unavailable else 1


def _down(args: argparse.Namespace) -> int:
    from kvmesh.deploy import ray_stack

    if not _connect(args, "down"):
        return 1
    names = ray_stack.down()
    print(f"kvmesh ray down: stopped {len(names)} actors {' '.join(names)}".rstrip())
    return 0
