"""`kvmesh serve`'s children: start a `kvmesh <role>` process, wait for its listening line,
stop it. Each child dies with the launcher even if that is killed (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from kvmesh.deploy.cli import command
from kvmesh.deploy.errors import StartFailed

_LISTENING = re.compile(r"^kvmesh (\w+) listening on (\S+)\s*$")
_PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 15.0
# the store copies its CPU tier to disk when stopped, for at most its --flush-s (default 20 s)
STORE_STOP_TIMEOUT_S = 30.0


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


def start(name: str, argv: list[str], env: dict[str, str]) -> Child:
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


def wait_ready(children: list[Child], timeout: float, interrupted: threading.Event) -> None:
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


def stop(children: list[Child]) -> None:
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
