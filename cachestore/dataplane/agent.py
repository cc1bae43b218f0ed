"""Making NIXL agents: which nixl build imports, UCX settings that must be in place before the
first agent, and a progress thread that sleeps when idle.

The nixl Python wrapper hard-codes the progress thread's delay to 0 (it spins: one core per idle
process); the config's `pthrDelay` is overridden here so the thread waits in poll() instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
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
# wait_done: polls back to back for SPIN_S (most transfers end within it), then sleeps between
# polls, FIRST_SLEEP_S doubling up to MAX_SLEEP_S, so a thread waiting on a slow or stalled
# peer does not hold a core.
SPIN_S = 200e-6
FIRST_SLEEP_S = 50e-6
MAX_SLEEP_S = 1e-3

_config_lock = threading.Lock()  # make_agent's swap of nixlBind.nixlAgentConfig

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
    # The swap is process-wide: under a lock, or two agents made at once could each keep the
    # other's patched class as "real" and leave it in place.
    with _config_lock:
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


class TransferTimeout(OSError):
    """A transfer still in progress at its deadline. `is_cancelled`: NIXL cancelled it and
    freed its handle; when False it may still touch its local memory later (don't reuse it)."""

    def __init__(self, message: str, is_cancelled: bool) -> None:
        super().__init__(message)
        self.is_cancelled = is_cancelled


def wait_done(agent: Any, handle: Any, what: str, deadline: float | None = None,
              lock: contextlib.AbstractContextManager[Any] | None = None) -> None:
    """Post a transfer and poll it to the end; releases the handle. `deadline`
    (time.monotonic(); None: none): past it the transfer is cancelled and TransferTimeout
    raised. `lock` is held for each call into the agent, not across the wait (other threads
    may use the agent between polls). Raises OSError unless it completed."""
    guard = lock if lock is not None else contextlib.nullcontext()
    try:
        with guard:
            state = agent.transfer(handle)
        started = time.monotonic()
        pause = 0.0
        while state == "PROC":
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if pause:
                time.sleep(pause if deadline is None else min(pause, max(0.0, deadline - now)))
                pause = min(2 * pause, MAX_SLEEP_S)
            elif now - started >= SPIN_S:
                pause = FIRST_SLEEP_S
            with guard:
                state = agent.check_xfer_state(handle)
    except BaseException:
        with guard, contextlib.suppress(Exception):
            agent.release_xfer_handle(handle)
        raise
    with guard:
        try:
            agent.release_xfer_handle(handle)
            released = True
        except Exception as exc:  # an active transfer NIXL could not cancel
            if state != "PROC":
                raise OSError(f"NIXL {what}: releasing its handle: {exc}") from exc
            log.warning("NIXL %s past its deadline could not be cancelled: %s", what, exc)
            released = False
    if state == "PROC":
        raise TransferTimeout(f"NIXL {what} timed out (the peer did not answer in time)",
                              is_cancelled=released)
    if state != "DONE":
        raise OSError(f"NIXL {what} ended {state}")
