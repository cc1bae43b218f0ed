"""What `kvmesh ray deploy` deploys: one frozen config, checked on construction.

Filled from `kvmesh ray deploy` flags (deploy/ray_cli.py), whose defaults come from `KVMESH_RAY_*`
environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmesh.deploy.errors import InvalidWorkerCounts, RayConfigError
from kvmesh.deploy.internal_auth import DeploymentSecrets, new_token, tenant_secret
from kvmesh.deploy.worker_plan import (
    gpu_memory_share,
    role_argv,
    router_worker_argv,
    worker_names,
    worker_roles,
)
from kvmesh.router.config import parse_api_keys, parse_processes
from kvmesh.router.errors import InvalidConfig

NAMESPACE = "kvmesh"  # Ray namespace holding every kvmesh actor and the placement group
ACTOR_PREFIX = "kvmesh-"
STORE_ACTOR = "kvmesh-store"
ROUTER_ACTOR = "kvmesh-router"
WORKER_GROUP = "kvmesh-workers"  # detached placement group, one bundle per worker


def _check_port(name: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise RayConfigError(f"{name} must be a TCP port in 1..65535, got {port}")


@dataclass(frozen=True)
class RayDeployConfig:
    """The kvmesh stack on a Ray cluster.

    Ports are fixed per role so a restarted actor comes back at the same address: the store and
    the router are pinned to the head node, and worker i always runs in bundle i of a detached
    placement group (the bundle stays on its node), listening on `worker_base_port + i`.
    Workers are `num_workers` colocated ones (None: 1), or `num_prefill_workers` prefill then
    `num_decode_workers` decode workers (prefill/decode disaggregation; not with num_workers).
    A worker given part of a GPU (`num_gpus_per_worker` < 1, e.g. 0.5: a prefill and a decode
    worker on one GPU) gets that share of the worker's default GPU memory utilization.
    """

    address: str = "auto"
    bind_host: str = "0.0.0.0"  # roles listen on every interface; others dial the node's IP
    namespace: str = NAMESPACE
    num_workers: int | None = None
    num_prefill_workers: int = 0
    num_decode_workers: int = 0
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    model: str | None = None  # None: the worker's default model (SmolLM2-135M-Instruct)
    redis_url: str | None = None
    store_port: int = 50051
    worker_base_port: int = 50100
    router_port: int = 8000
    router_processes: str | None = None  # `kvmesh router --processes`; None: its default, 1
    store_cpu_bytes: int | None = None
    store_disk_dir: str | None = None
    worker_host_tier_bytes: int | None = None  # each worker's host CPU tier, on its own node
    api_key: str | None = None  # router clients must send it (Authorization: Bearer ...)
    # bearer token between router, workers and store; None: a random one for this deployment
    token: str | None = None
    tenant_secret: str | None = None  # None: KVMESH_TENANT_SECRET, else random per deployment
    max_restarts: int = 5
    ready_timeout_s: float = 600.0
    store_args: tuple[str, ...] = field(default_factory=tuple)  # passed through to the role CLI
    worker_args: tuple[str, ...] = field(default_factory=tuple)
    router_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        try:
            num_workers = len(self.worker_roles)
        except InvalidWorkerCounts as exc:
            raise RayConfigError(str(exc)) from None
        if self.num_cpus_per_worker < 0 or self.num_gpus_per_worker < 0:
            raise RayConfigError("--num-cpus-per-worker and --num-gpus-per-worker must be >= 0")
        if self.num_cpus_per_worker == 0 and self.num_gpus_per_worker == 0:
            # a placement group bundle must reserve something
            raise RayConfigError("a worker must reserve some CPUs or GPUs")
        if self.num_gpus_per_worker > 1:
            raise RayConfigError("one worker serves one device: --num-gpus-per-worker <= 1")
        for name, port in (("--store-port", self.store_port), ("--port", self.router_port),
                           ("--worker-port", self.worker_base_port)):
            _check_port(name, port)
        _check_port("--worker-port + workers - 1", self.worker_base_port + num_workers - 1)
        if self.store_port == self.router_port:
            raise RayConfigError("the store and the router need different ports")
        worker_ports = range(self.worker_base_port, self.worker_base_port + num_workers)
        if self.store_port in worker_ports or self.router_port in worker_ports:
            raise RayConfigError("worker ports overlap the store or router port")
        if self.router_processes is not None:
            try:
                parse_processes(self.router_processes)
            except ValueError as exc:
                raise RayConfigError(f"--router-processes: {exc}") from None
        if self.max_restarts < 0:
            raise RayConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.ready_timeout_s <= 0:
            raise RayConfigError("--timeout must be positive")
        if self.store_cpu_bytes is not None and self.store_cpu_bytes <= 0:
            raise RayConfigError("--store-cpu-bytes must be positive")
        if self.worker_host_tier_bytes is not None and self.worker_host_tier_bytes < 0:
            raise RayConfigError("--host-tier-bytes must be >= 0")
        if not self.namespace:
            raise RayConfigError("--namespace must not be empty")
        try:
            parse_api_keys([self.api_key or ""])
        except InvalidConfig as exc:
            raise RayConfigError(f"--api-key: {exc}") from None
        if self.token is None:
            object.__setattr__(self, "token", new_token())
        if self.tenant_secret is None:
            object.__setattr__(self, "tenant_secret", tenant_secret(None))

    def role_env(self, role: str) -> dict[str, str]:
        """The role's secrets, for its process environment (never its argv)."""
        assert self.token is not None and self.tenant_secret is not None  # __post_init__
        secrets = DeploymentSecrets(self.token, self.tenant_secret,
                                    parse_api_keys([self.api_key or ""]))
        if role == "store":
            return secrets.store_env(shared_tier=self.redis_url is not None)
        return {"worker": secrets.worker_env, "router": secrets.router_env}[role]()

    @property
    def worker_roles(self) -> list[str]:
        """Each worker's role, by index (raises InvalidWorkerCounts for counts that clash)."""
        return worker_roles(self.num_workers, self.num_prefill_workers, self.num_decode_workers)

    @property
    def worker_actor_names(self) -> list[str]:
        """`kvmesh-worker-<i>`, or `kvmesh-prefill-worker-<i>` / `kvmesh-decode-worker-<i>`."""
        return [ACTOR_PREFIX + name.replace(" ", "-")
                for name in worker_names(self.worker_roles)]

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus_per_worker > 0 else "cpu"

    def worker_port(self, index: int) -> int:
        return self.worker_base_port + index

    def store_argv(self) -> list[str]:
        argv = ["--host", self.bind_host, "--port", str(self.store_port)]
        if self.store_cpu_bytes is not None:
            argv += ["--cpu-bytes", str(self.store_cpu_bytes)]
        if self.store_disk_dir:
            argv += ["--disk-dir", self.store_disk_dir]
        if self.redis_url:
            argv += ["--redis-url", self.redis_url]
        return argv + list(self.store_args)

    def worker_argv(self, index: int, store_address: str) -> list[str]:
        argv = ["--device", self.device, "--store", store_address,
                "--host", self.bind_host, "--port", str(self.worker_port(index)),
                *role_argv(self.worker_roles[index])]
        if 0 < self.num_gpus_per_worker < 1:
            argv += ["--gpu-memory-utilization",
                     str(gpu_memory_share(self.num_gpus_per_worker))]
        if self.model:
            argv += ["--model", self.model]
        if self.worker_host_tier_bytes is not None:
            argv += ["--host-tier-bytes", str(self.worker_host_tier_bytes)]
        return argv + list(self.worker_args)

    def router_argv(self, worker_addresses: list[str], store_address: str) -> list[str]:
        argv = router_worker_argv(self.worker_roles, worker_addresses)
        argv += ["--store", store_address, "--host", self.bind_host,
                 "--port", str(self.router_port)]
        if self.model and self.model != "smollm2":  # "smollm2" is the router's default too
            argv += ["--model", self.model]  # the router tokenizes with the workers' model
        if self.router_processes is not None:
            argv += ["--processes", self.router_processes]
        return argv + list(self.router_args)
