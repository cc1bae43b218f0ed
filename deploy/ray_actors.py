"""kvmesh roles as named, detached Ray actors.

Each actor runs one `kvmesh <role>` CLI as a child process and lives exactly as long as it:
- the child is started with PR_SET_PDEATHSIG = SIGKILL, so when Ray kills the actor (ray.kill,
  node drain, OOM) the kernel kills the child too and its port is free before Ray restarts the
  actor (a SIGTERM'd gRPC server could still hold it, and gRPC binds with SO_REUSEPORT, so two
  incarnations could share the port);
- when the child dies on its own, the actor exits the process, so Ray sees an actor failure and
  restarts it (max_restarts); the restarted actor starts a fresh child on the same port.
Running the role in a child process keeps CUDA, gRPC and event-loop state out of the Ray worker
process and gives the same program users run by hand.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import ray

from kvmesh.deploy.cli import command
from kvmesh.deploy.errors import RoleStartError

_PR_SET_PDEATHSIG = 1
_LISTENING = re.compile(r"kvmesh (\w+) listening on (\S+)")
_ANY_HOST = {"0.0.0.0", "::", "[::]", ""}
_STOP_GRACE_S = 10.0
_RESTART_ATTEMPTS = 3
_RESTART_BACKOFF_S = 2.0


@dataclass(frozen=True)
class RoleInfo:
    """What `kvmesh ray status` shows for one actor."""

    role: str
    address: str  # host:port others connect to (the node's IP when the child binds all hosts)
    node_ip: str
    node_id: str
    actor_pid: int
    child_pid: int
    is_restarted: bool  # this incarnation was started by Ray after a failure


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask the kernel to SIGKILL the child when the thread that forked it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def advertised_address(listen_address: str, node_ip: str) -> str:
    """The address other nodes dial for a child that printed `listening on listen_address`."""
    host, _, port = listen_address.rpartition(":")
    if host in _ANY_HOST:
        host = node_ip
    return f"{host}:{port}"


def role_command(role: str, argv: list[str]) -> list[str]:
    # `python -m deploy.cli` rather than the `kvmesh` script: the actor's PATH may lack it
    return [*command(), role, *argv]


class RoleActor:
    """One kvmesh role (store, worker or router) in a child process; see the module docstring.

    `__init__` returns once the child printed `kvmesh <role> listening on HOST:PORT`, so a
    method call on a (re)started actor waits for the role to be ready.
    """

    def __init__(self, role: str, argv: list[str], ready_timeout_s: float,
                 env: dict[str, str] | None = None) -> None:
        self._role = role
        self._command = role_command(role, argv)
        self._env = env or {}  # the role's secrets: environment, never argv
        self._is_stopping = False
        self._output_tail: deque[str] = deque(maxlen=40)
        context = ray.get_runtime_context()
        is_restarted = context.was_current_actor_reconstructed
        # after a crash the old child may still hold the port for a moment: retry briefly
        for attempt in range(_RESTART_ATTEMPTS if is_restarted else 1):
            if attempt:
                time.sleep(_RESTART_BACKOFF_S * attempt)
            listen_address = self._start_child(ready_timeout_s)
            if listen_address is not None:
                break
        else:
            raise RoleStartError(f"kvmesh {role} exited with {self._exit_code} before listening; "
                                 f"last output:\n{self._tail()}")
        node_ip = ray.util.get_node_ip_address()
        assert self._child is not None
        self._info = RoleInfo(
            role=role, address=advertised_address(listen_address, node_ip), node_ip=node_ip,
            node_id=context.get_node_id(), actor_pid=os.getpid(), child_pid=self._child.pid,
            is_restarted=is_restarted)

    def _start_child(self, ready_timeout_s: float) -> str | None:
        """Start the child; its listen address, or None when it exited before listening."""
        self._ready = threading.Event()
        self._listen_address: str | None = None
        self._child: subprocess.Popen[str] | None = None
        self._exit_code: int | None = None
        # the supervising thread forks the child and lives as long as it (PDEATHSIG is per thread)
        thread = threading.Thread(target=self._supervise, name=f"kvmesh-{self._role}",
                                  daemon=True)
        thread.start()
        if not self._ready.wait(ready_timeout_s):
            self._kill_child()
            raise RoleStartError(f"kvmesh {self._role} was not listening after "
                                 f"{ready_timeout_s:.0f}s; last output:\n{self._tail()}")
        return self._listen_address

    def _supervise(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self._env)
        parent_pid = os.getpid()
        try:
            self._child = subprocess.Popen(
                self._command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, env=env,
                preexec_fn=lambda: _die_with_parent(parent_pid))
        except OSError as exc:
            self._output_tail.append(f"cannot start {self._command}: {exc}")
            self._ready.set()
            return
        assert self._child.stdout is not None
        for line in self._child.stdout:
            sys.stdout.write(line)  # Ray keeps actor stdout in the session's log files
            self._output_tail.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and not self._ready.is_set():
                self._listen_address = match.group(2)
                self._ready.set()
        self._exit_code = self._child.wait()
        if not self._ready.is_set():
            self._ready.set()  # __init__ reports the failure; Ray does not restart on it
            return
        if not self._is_stopping:
            print(f"kvmesh {self._role} exited with {self._exit_code}; exiting so Ray restarts "
                  "this actor", flush=True)
            os._exit(1)

    def _tail(self) -> str:
        return "\n".join(self._output_tail)

    def _kill_child(self) -> None:
        self._is_stopping = True
        child = self._child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def info(self) -> dict[str, object]:
        return asdict(self._info)

    def stop(self) -> int | None:
        """Stop the child (SIGTERM, then SIGKILL after a grace period); returns its exit code.
        The actor stays up, so Ray does not restart anything; kill it afterwards."""
        self._kill_child()
        return None if self._child is None else self._child.returncode


def wait_ready(handles: list[ray.actor.ActorHandle], timeout_s: float) -> list[RoleInfo]:
    """Block until every actor answers `info` (its child is listening). Raises GetTimeoutError
    on timeout and the first actor's failure as soon as it happens (not after the others)."""
    deadline = time.monotonic() + timeout_s
    refs: list[ray.ObjectRef] = [handle.info.remote() for handle in handles]
    pending: list[ray.ObjectRef] = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1,
                                 timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} actors not ready")
        ray.get(done)  # raises the actor's failure now
    infos: list[dict[str, object]] = ray.get(refs)
    return [RoleInfo(**info) for info in infos]  # type: ignore[arg-type]


def start_error(exc: Exception) -> str:
    """The RoleStartError message inside a Ray actor failure, else the failure's text."""
    text = str(exc)
    marker = f"{RoleStartError.__name__}: "
    return text.split(marker, 1)[1].strip() if marker in text else text


RemoteRoleActor = ray.remote(RoleActor)
