"""Which workers a launcher starts, in which role, and how they share GPUs and reach the router.

One plan for `kvmesh serve` (deploy/local.py) and `kvmesh ray deploy` (deploy/ray_config.py):
either `--workers N` colocated workers (role `both`), or prefill/decode disaggregation with
`--prefill-workers N --decode-workers M` (`kvmesh worker --role prefill|decode`, handed over
through the store; the router runs the handoff and falls back to colocated on a decode worker).
"""

from __future__ import annotations

from collections import Counter

from kvmesh.deploy.errors import InvalidWorkerCounts
from kvmesh.workers.config import WorkerConfig

BOTH, PREFILL, DECODE = "both", "prefill", "decode"
# roles that can finish a request on their own: the stack serves while one of them lives
DECODE_CAPABLE = (BOTH, DECODE)
_ROUTER_FLAG = {BOTH: "--worker", PREFILL: "--prefill-worker", DECODE: "--decode-worker"}


def worker_roles(num_workers: int | None, num_prefill: int, num_decode: int,
                 default_workers: int = 1) -> list[str]:
    """The role of every worker, prefill workers first. `num_workers` None: not given (then
    `default_workers` colocated workers unless prefill/decode counts are). Raises
    InvalidWorkerCounts when the counts do not go together."""
    if num_prefill < 0 or num_decode < 0:
        raise InvalidWorkerCounts("--prefill-workers and --decode-workers must be >= 0")
    if not num_prefill and not num_decode:
        count = default_workers if num_workers is None else num_workers
        if count < 1:
            raise InvalidWorkerCounts(f"--workers must be at least 1, got {count}")
        return [BOTH] * count
    if num_workers is not None:
        raise InvalidWorkerCounts("--workers and --prefill-workers/--decode-workers exclude "
                                  "each other: give either colocated or disaggregated workers")
    if not num_prefill or not num_decode:
        raise InvalidWorkerCounts("--prefill-workers and --decode-workers go together (each "
                                  f"at least 1), got {num_prefill} and {num_decode}")
    return [PREFILL] * num_prefill + [DECODE] * num_decode


def worker_names(roles: list[str]) -> list[str]:
    """`worker i` for colocated workers, `prefill worker i` / `decode worker i` otherwise (i
    counts within the role)."""
    seen: Counter[str] = Counter()
    names = []
    for role in roles:
        names.append(f"worker {seen[role]}" if role == BOTH else f"{role} worker {seen[role]}")
        seen[role] += 1
    return names


def role_argv(role: str) -> list[str]:
    """The worker's `--role` flag; none for `both`, the worker's default."""
    return [] if role == BOTH else ["--role", role]


def router_worker_argv(roles: list[str], addresses: list[str]) -> list[str]:
    """`--worker A`, `--prefill-worker A` or `--decode-worker A` for every worker."""
    argv: list[str] = []
    for role, address in zip(roles, addresses, strict=True):
        argv += [_ROUTER_FLAG[role], address]
    return argv


def gpu_memory_share(fraction: float) -> float:
    """The `--gpu-memory-utilization` of a worker given `fraction` of one GPU (processes that
    share a GPU split the worker's default utilization)."""
    return round(WorkerConfig.gpu_memory_utilization * fraction, 4)


def cuda_devices(num_workers: int, num_gpus: int) -> list[tuple[int, float | None]]:
    """Round-robin GPUs for `num_workers` workers: (device index, `--gpu-memory-utilization`
    share, or None when the worker has its GPU to itself)."""
    num_gpus = max(1, num_gpus)
    devices = [i % num_gpus for i in range(num_workers)]
    per_gpu = Counter(devices)
    return [(d, None if per_gpu[d] == 1 else gpu_memory_share(1 / per_gpu[d]))
            for d in devices]
