"""`kvmesh worker`: serve one model over gRPC until SIGINT/SIGTERM.

Every WorkerConfig field is a flag and a `KVMESH_WORKER_<FIELD>` environment variable; a flag
wins over the environment, which wins over the dataclass default. That mapping lives only here
(`config_from_args`). Once serving, stdout gets exactly one line:
`kvmesh worker listening on HOST:PORT` (launchers wait for it).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "KVMESH_WORKER_"

# WorkerConfig field -> (parser of its string form, help). Flags are --field-with-dashes.
_FIELDS: dict[str, tuple[Any, str]] = {
    "model": (str, '"smollm2" (bundled GGUF), a Hugging Face folder or a .gguf file'),
    "device": (str, "cpu or cuda[:N]"),
    "dtype": (str, "auto, float32, float16 or bfloat16"),
    "page_size": (int, "tokens per KV page"),
    "kv_cache_bytes": (int, "KV pool bytes (default: from free GPU memory, or 512 MiB on CPU)"),
    "max_num_seqs": (int, "most sequences in one batch"),
    "max_num_batched_tokens": (int, "token budget of one step (chunked prefill)"),
    "max_model_len": (int, "context length (default: the model's)"),
    "host_tier_bytes": (int, "host tier that evicted pages demote to; 0 = off"),
    "store": (str, "gRPC address of a kvmesh store"),
    "store_token": (str, "bearer token of the store"),
    "role": (str, "both (default), prefill or decode: the halves of a disaggregated request, "
                  "handed over through the store (needs --store)"),
    "enforce_eager": (None, "no CUDA graphs"),
    "decode_steps": (int, "greedy decode steps queued on the device at once (default: 8 "
                     "with CUDA graphs, else 1)"),
    "gpu_memory_utilization": (float, "fraction of GPU memory the worker may use"),
    "seed": (int, "engine seed"),
    "grpc_server": (str, "sync (default: a thread per stream) or aio (grpc.aio, streams on one "
                         "event loop)"),
}
# Serving settings that are not engine config.
_SERVING: dict[str, tuple[Any, str]] = {
    "host": (str, "address to bind (default 127.0.0.1)"),
    "port": (int, "port to bind; 0 = a free port (default 0)"),
    "token": (str, "require this bearer token on every call but health"),
    "tls_cert": (str, "PEM certificate chain; with --tls-key serves TLS"),
    "tls_key": (str, "PEM private key"),
    "torch_threads": (int, "CPU threads torch may use (default: torch's, one per core); "
                           "workers sharing a machine's cores should split them"),
}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker", help="serve one model over gRPC",
        description=__doc__.split("\n\n")[0] + f" Environment: {ENV_PREFIX}<FLAG>.",
    )
    for name, (kind, help_text) in {**_FIELDS, **_SERVING}.items():
        flag = "--" + name.replace("_", "-")
        if kind is None:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    parser.add_argument("--log-level", default="INFO", help="logging level on stderr")
    parser.set_defaults(func=run)


def _value(args: argparse.Namespace, environ: Mapping[str, str], name: str, kind: Any) -> Any:
    """The flag's value, else the environment's (parsed), else None (meaning: the default)."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    text = environ.get(ENV_PREFIX + name.upper())
    if text is None:
        return None
    try:
        return (kind or _parse_bool)(text)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: {exc}") from None


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Any:
    """WorkerConfig from flags and KVMESH_WORKER_* variables. Raises InvalidConfig/ValueError."""
    from kvmesh.workers.config import WorkerConfig

    fields = {}
    for name, (kind, _) in _FIELDS.items():
        value = _value(args, environ, name, kind)
        if value is not None:
            fields[name] = value
    return WorkerConfig(**fields)


@dataclass(frozen=True)
class Serving:
    """Where and how the worker listens (not engine config)."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.token is not None and not self.token:
            raise ValueError("token must not be empty (omit it to disable auth)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{path!r} is not a file")


def serving_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> Serving:
    values = {name: _value(args, environ, name, kind) for name, (kind, _) in _SERVING.items()}
    return Serving(**{name: value for name, value in values.items() if value is not None})


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        serving = serving_from_args(args)
    except ValueError as exc:
        print(f"kvmesh worker: {exc}", file=sys.stderr)
        return 2
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())

    from kvmesh.workers.service.server import serve_worker

    if serving.torch_threads is not None:
        import torch

        torch.set_num_threads(serving.torch_threads)

    try:
        handle = serve_worker(config, serving.host, serving.port, token=serving.token,
                              tls_cert=serving.tls_cert, tls_key=serving.tls_key)
    except Exception as exc:  # noqa: BLE001 - a clear line, not a traceback
        logging.getLogger(__name__).debug("start failed", exc_info=True)
        print(f"kvmesh worker: failed to start: {exc}", file=sys.stderr)
        return 1
    print(f"kvmesh worker listening on {handle.address}", flush=True)
    # the loaded model, pool bookkeeping and server live as long as the process: out of the
    # cyclic GC's scans, whose full passes over them would stall the engine thread for ms
    gc.collect()
    gc.freeze()
    if stop_requested.is_set():
        handle.stop()
        return 0
    while not stop_requested.wait(1.0):
        pass
    print("kvmesh worker: shutting down", file=sys.stderr, flush=True)
    handle.stop()
    return 0
