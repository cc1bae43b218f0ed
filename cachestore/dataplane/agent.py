"""Making NIXL agents: which nixl build imports, UCX settings that must be in place before the
first agent, and a progress thread that sleeps when idle.

The nixl Python wrapper hard-codes the progress thread's delay to 0 (it spins: one core per idle
process); the config's `pthrDelay` is overridden here so the thread waits in poll() instead.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# UCX's TCP transport moves 8 KiB segments by default: about 0.3 GB/s. These ran at 1.7-2 GB/s
# on loopback (measured for issue 24); set before the first agent, unless the deployment did.
UCX_DEFAULTS = {
    "UCX_TCP_TX_SEG_SIZE": "256k",
    "UCX_TCP_RX_SEG_SIZE": "256k",
    "UCX_TCP_SNDBUF": "8m",
    "UCX_TCP_RCVBUF": "8m",
}
PROGRESS_DELAY_US = 1000  # the progress thread's poll timeout when nothing is happening



class ArenaInfo(NamedTuple):
    """A registered store arena (CpuTier.arenas()): NIXL remote addresses lie in one."""

    arena_id: int
    address: int
    nbytes: int


_api: ModuleType | None = None
_why_not = ""


def nixl_api() -> ModuleType | None:
    """nixl's `_api` module (nixl-cu13's own, else the `nixl` meta package's), or None when
    nixl is not installed or does not load here (`why_unavailable` says why)."""
    global _api, _why_not
    if _api is not None or _why_not:
        return _api
    import importlib

    raise_exceptions = logging.raiseExceptions
    for name in ("nixl_cu13._api", "nixl._api"):
        try:
            _api = importlib.import_module(name)
        except Exception as exc:  # ImportError, or a native library that does not load
            _why_not = _why_not or f"{name}: {exc}"
            continue
        _quiet_nixl_logging(raise_exceptions)
        return _api
    return None


def _quiet_nixl_logging(raise_exceptions: bool) -> None:
    """nixl's import configures its logger to print INFO lines on stdout (a server's stdout is
    its output, e.g. `kvmesh store`'s listening line) and sets logging.raiseExceptions: its
    records go through the application's logging instead, from WARNING (or NIXL_LOG_LEVEL)."""
    logging.raiseExceptions = raise_exceptions
    nixl_logger = logging.getLogger("nixl")
    for handler in list(nixl_logger.handlers):
        nixl_logger.removeHandler(handler)
    nixl_logger.propagate = True
    if not os.environ.get("NIXL_LOG_LEVEL"):
        nixl_logger.setLevel(logging.WARNING)


def why_unavailable() -> str:
    return _why_not if nixl_api() is None else ""


def make_agent(name: str, progress_thread: bool) -> Any:
    """A NIXL agent with the UCX backend. `progress_thread`: the store side, whose UCX worker
    must keep progressing for peers' one-sided transfers over TCP; a client polls its own
    transfers instead. Raises RuntimeError when nixl is unavailable."""
    api = nixl_api()
    if api is None:
        raise RuntimeError(f"nixl is not available: {_why_not}")
    for key, value in UCX_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not os.path.exists("/dev/infiniband"):
        # UCX's ib module, loaded with libibverbs installed but no RDMA device, crashed every
        # process at exit (SIGSEGV after main returned; nixl-cu13 1.5.1); it has nothing to do
        os.environ.setdefault("UCX_MODULES", "^ib")
    real = api.nixlBind.nixlAgentConfig

    class _SleepingProgress(real):  # type: ignore[misc, valid-type]
        def __setattr__(self, key: str, value: Any) -> None:
            super().__setattr__(key, PROGRESS_DELAY_US if key == "pthrDelay" else value)

    api.nixlBind.nixlAgentConfig = _SleepingProgress
    try:
        config = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
        return api.nixl_agent(name, config)
    finally:
        api.nixlBind.nixlAgentConfig = real


def wait_done(agent: Any, handle: Any, what: str) -> None:
    """Post a transfer and poll it to the end; releases the handle. Raises OSError unless it
    completed."""
    try:
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
    finally:
        agent.release_xfer_handle(handle)
    if state != "DONE":
        raise OSError(f"NIXL {what} ended {state}")
