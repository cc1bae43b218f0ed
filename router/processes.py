"""`kvmesh router --processes N`: N serving processes on one port, under a parent that starts,
watches and stops them.

One asyncio loop caps HTTP serving (on an H100 host the router's loop reached 84 % of a core at
18.6k tok/s while the engine alone did 30k). Each serving process is a whole single-process
router (`python -m kvmesh.router.cli`, settings in `KVMESH_ROUTER_*` variables, never argv) with
its own worker pool, prefix index (its own KvEvents subscriptions), store probe and tokenizer; all
bind the same host:port with SO_REUSEPORT, and the kernel spreads new connections over them. The
parent:
- reserves the port first (a bound, never listening SO_REUSEPORT socket held for its life): port
  0 becomes one concrete port every process binds, and nothing else takes it during a restart;
- points every process at one prometheus_client multiprocess folder, so `/metrics` from any of
  them shows every process's values merged; a dead process's `live*` gauges are dropped
  (`mark_process_dead`);
- prints `kvmesh router listening on HOST:PORT` once, after every process listens;
- restarts a process that exits; more than RESTART_LIMIT restarts within RESTART_WINDOW_S is a
  crash loop, and the router stops with exit code 1;
- on SIGTERM/SIGINT stops every process (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and exits 0.
Serving processes get SIGKILL if the parent dies (PR_SET_PDEATHSIG): none may keep the port.

Each process counts its own in-flight requests: `max_inflight` is split between them, and the
load-balancing terms see one process's share of the traffic (approximate across processes).
"""

from __future__ import annotations

import collections
import ctypes
import glob
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

from kvmesh.router.config import RouterConfig, config_env
from kvmesh.router.metrics import MULTIPROC_DIR_ENV

PROCESS_INDEX_ENV = "KVMESH_ROUTER_PROCESS_INDEX"  # set for a serving process: its index
PROCESS_HEADER = "X-Kvmesh-Router-Process"  # every response of a serving process: its index
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 15.0
START_MARGIN_S = 120.0  # beyond --ready-timeout: tokenizer load and binding
_LISTENING = re.compile(r"^kvmesh router listening on (\S+)\s*$")
_PR_SET_PDEATHSIG = 1


@dataclass
class _Process:
    """One serving process; `address` is set once it printed its listening line."""

    index: int
    popen: subprocess.Popen
    address: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


def reserve_port(host: str, port: int) -> socket.socket:
    """Check that host:port is free (as a plain bind would), then hold it with a bound, never
    listening SO_REUSEPORT socket: the caller's serving processes bind the held port. Raises
    OSError when another program has it. The kernel never hands connections to a socket that
    does not listen."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # no SO_REUSEPORT here: a port some other SO_REUSEPORT listener holds must fail
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        chosen = probe.getsockname()
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(chosen)
    return held


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the forking thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Supervisor:
    def __init__(self, env: dict[str, str], argv: list[str], metrics_dir: str) -> None:
        self._env = env
        self._argv = argv
        self._metrics_dir = metrics_dir
        self.processes: list[_Process] = []

    def spawn(self, index: int) -> _Process:
        popen = subprocess.Popen(
            [sys.executable, "-P", "-m", "kvmesh.router.cli", *self._argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, bufsize=1,
            preexec_fn=_die_with_parent,
            env={**os.environ, **self._env, PROCESS_INDEX_ENV: str(index)})
        process = _Process(index, popen)

        def pump() -> None:  # the listening line is ours to print; the rest goes to stderr
            assert popen.stdout is not None
            for line in popen.stdout:
                match = _LISTENING.match(line)
                if match and not process.ready.is_set():
                    process.address = match.group(1)
                    process.ready.set()
                else:
                    sys.stderr.write(f"[router process {index}] {line}")
            process.ready.set()

        threading.Thread(target=pump, name=f"pump-router-{index}", daemon=True).start()
        return process

    def wait_listening(self, timeout: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            while not process.ready.wait(0.2):
                if stop.is_set() or time.monotonic() > deadline:
                    return False
            if process.address is None:
                print(f"kvmesh router: process {process.index} exited with code "
                      f"{process.popen.wait()} before listening", file=sys.stderr, flush=True)
                return False
        return True

    def supervise(self, stop: threading.Event) -> int:
        """Restart whichever process exits until asked to stop (0) or a crash loop (1)."""
        restarts: collections.deque[float] = collections.deque()
        while not stop.wait(0.2):
            for i, process in enumerate(self.processes):
                code = process.popen.poll()
                if code is None:
                    continue
                self._mark_dead(process)
                now = time.monotonic()
                restarts.append(now)
                while restarts and restarts[0] < now - RESTART_WINDOW_S:
                    restarts.popleft()
                if len(restarts) > RESTART_LIMIT:
                    print(f"kvmesh router: process {i} exited with code {code}, the "
                          f"{len(restarts)}th exit within {RESTART_WINDOW_S:.0f} s; stopping",
                          file=sys.stderr, flush=True)
                    return 1
                print(f"kvmesh router: process {i} (pid {process.popen.pid}) exited with code "
                      f"{code}; restarting it", file=sys.stderr, flush=True)
                self.processes[i] = self.spawn(i)
        return 0

    def stop_all(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            try:
                process.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"kvmesh router: process {process.index} ignored SIGTERM; killing it",
                      file=sys.stderr, flush=True)
                process.popen.kill()
                process.popen.wait()
            self._mark_dead(process)

    def _mark_dead(self, process: _Process) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(process.popen.pid, self._metrics_dir)


def _metrics_dir() -> tuple[str, bool]:
    """(folder, owned): PROMETHEUS_MULTIPROC_DIR when set (its old `*.db` files removed: they
    would add a previous run's counts), else a fresh folder of ours, removed at exit."""
    given = os.environ.get(MULTIPROC_DIR_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for path in glob.glob(os.path.join(given, "*.db")):
            os.remove(path)
        return given, False
    return tempfile.mkdtemp(prefix="kvmesh-router-metrics-"), True


def run_processes(config: RouterConfig, ready_timeout: float, log_level: str) -> int:
    """Serve `config` with `config.num_processes` processes until SIGTERM/SIGINT (0); 1 when
    one cannot start or they crash in a loop; 2 when the port is taken."""
    num_processes = config.num_processes
    try:
        held = reserve_port(config.host, config.port)
    except OSError as exc:
        print(f"kvmesh router: cannot bind {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    metrics_dir, is_owned = _metrics_dir()
    child = replace(config, port=held.getsockname()[1], num_processes=1,
                    max_inflight=math.ceil(config.max_inflight / num_processes))
    supervisor = _Supervisor({**config_env(child), MULTIPROC_DIR_ENV: metrics_dir},
                             ["--ready-timeout", str(ready_timeout), "--log-level", log_level],
                             metrics_dir)
    try:
        for i in range(num_processes):  # each kept at once: stop_all stops what started
            supervisor.processes.append(supervisor.spawn(i))
        if not supervisor.wait_listening(ready_timeout + START_MARGIN_S, stop):
            return 0 if stop.is_set() else 1
        print(f"kvmesh router listening on {supervisor.processes[0].address}", flush=True)
        return supervisor.supervise(stop)
    finally:
        supervisor.stop_all()
        held.close()
        if is_owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
