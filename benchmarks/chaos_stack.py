"""The chaos benchmark's stack: a private redis-server, a store, two CPU workers and a router,
each its own subprocess on a port fixed at start, so any part can be SIGKILLed (or SIGSTOPped)
and restarted on the same address while the others keep running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from kvmesh.deploy.cli import command
from kvmesh.deploy.internal_auth import DeploymentSecrets, new_token

START_TIMEOUT_S = 300.0
_LISTENING = re.compile(r"listening on (\S+:\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Part:
    """One process of the stack. `start()` runs it (again) with the same argv and port;
    `kill()` is SIGKILL; `pause()` / `resume()` are SIGSTOP / SIGCONT. Its stderr (and, for
    kvmesh roles, every stdout line but the listening one) goes to `log_dir/<name>.log`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_dir: Path
    port: int
    is_kvmesh: bool = True
    num_starts: int = 0
    popen: subprocess.Popen | None = None
    _listening: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is running"
        self.num_starts += 1
        self._listening.clear()
        log = open(self.log_dir / f"{self.name}.log", "ab")  # noqa: SIM115 - child owns a dup
        log.write(f"--- start {self.num_starts} at {time.time():.0f}\n".encode())
        log.flush()
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        threading.Thread(target=self._pump, args=(self.popen,), daemon=True).start()

    def _pump(self, popen: subprocess.Popen) -> None:
        assert popen.stdout is not None
        with open(self.log_dir / f"{self.name}.log", "ab") as log:
            for raw in popen.stdout:
                if _LISTENING.search(raw.decode(errors="replace")):
                    self._listening.set()
                else:
                    log.write(raw)
                    log.flush()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is None or self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited before it was ready: see its log")
            if self.is_kvmesh and self._listening.wait(0.2):
                return
            if not self.is_kvmesh and _redis_ping(self.port):
                return
            if not self.is_kvmesh:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f} s")

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.popen.poll() is None else None

    def rss_bytes(self) -> int | None:
        """Resident memory of the process and its children; None when it is not running."""
        pid = self.pid
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.NoSuchProcess:
            return None

    def _signal(self, sig: int) -> None:
        if self.pid is not None:
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(30)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self._signal(signal.SIGTERM)
        if self.popen is not None:
            try:
                self.popen.wait(40)
            except subprocess.TimeoutExpired:
                self.kill()


def _redis_ping(port: int) -> bool:
    return redis_command(port, "PING") == b"+PONG"


def redis_command(port: int, name: str) -> bytes:
    """The first reply line of a one-word Redis command (b"" if Redis is not answering)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(name.encode() + b"\r\n")
            return s.recv(64).split(b"\r\n")[0]
    except OSError:
        return b""


@dataclass
class Stack:
    """redis, store, worker0, worker1, router (start order); `parts` by name."""

    url: str
    api_keys: dict[str, str]
    parts: dict[str, Part]

    def start(self) -> None:
        for part in self.parts.values():
            part.start()
            if not part.name.startswith("worker"):
                part.wait_ready()
            elif part.name == "worker1":  # the workers load the model side by side
                self.parts["worker0"].wait_ready()
                part.wait_ready()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the router's /health lists every worker as up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                health = httpx.get(self.url + "/health", timeout=10).json()
                if health["workers"] and all(health["workers"].values()):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"workers not all healthy within {timeout:.0f} s")

    def stop(self) -> None:
        for part in reversed(self.parts.values()):
            part.stop()


def build_stack(log_dir: Path, *, num_tenants: int, store_cpu_bytes: int, disk_bytes: int,
                kv_cache_bytes: int, max_model_len: int) -> Stack:
    """Ports are picked free now and kept for every restart. The store's tiers are chained
    cpu -> disk -> redis: small cpu and disk tiers push pages down into Redis."""
    api_keys = {f"chaos-key-{i}": f"tenant{i}" for i in range(num_tenants)}
    secrets = DeploymentSecrets(new_token(), new_token(), api_keys)
    ports = {name: free_port() for name in ("redis", "store", "worker0", "worker1", "router")}
    store_addr = f"127.0.0.1:{ports['store']}"
    (log_dir / "redis").mkdir(parents=True, exist_ok=True)
    (log_dir / "disk").mkdir(exist_ok=True)
    parts = [Part("redis", ["redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", str(log_dir / "redis"),
                            "--protected-mode", "no"], {}, log_dir, ports["redis"],
                  is_kvmesh=False),
             Part("store", command("store", "--port", str(ports["store"]),
                                   "--cpu-bytes", str(store_cpu_bytes),
                                   "--disk-dir", str(log_dir / "disk"),
                                   "--disk-bytes", str(disk_bytes),
                                   "--redis-url", f"redis://127.0.0.1:{ports['redis']}/0"),
                  secrets.store_env(), log_dir, ports["store"])]
    for i in range(2):
        name = f"worker{i}"
        parts.append(Part(name, command(
            "worker", "--port", str(ports[name]), "--store", store_addr, "--torch-threads", "1",
            "--max-model-len", str(max_model_len), "--kv-cache-bytes", str(kv_cache_bytes)),
            secrets.worker_env(), log_dir, ports[name]))
    parts.append(Part("router", command(
        "router", "--port", str(ports["router"]), "--store", store_addr,
        "--worker", f"127.0.0.1:{ports['worker0']}", "--worker", f"127.0.0.1:{ports['worker1']}"),
        secrets.router_env(), log_dir, ports["router"]))
    return Stack(f"http://127.0.0.1:{ports['router']}", api_keys, {p.name: p for p in parts})
