"""Shared fixtures: real redis-server processes (single node and a 3-master cluster) on free
loopback ports, small KV pages for store tests, and the import graph the layer tests read.
Nothing here touches the system Redis."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

# The tests import kvmesh as installed (`kvmesh.*`), never the repository's folders. With the
# repository root on sys.path (`python -m pytest` without -P), its `kernels/` folder would shadow
# Hugging Face's `kernels` package, which transformers imports.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _REPO_ROOT]

# Routers the tests start serve from one process unless a test asks for more (`--processes`):
# one is the default already, and this pins it should the default change: several processes
# balance only approximately across them, and the tests assert exact routing.
os.environ.setdefault("KVMESH_ROUTER_PROCESSES", "1")

_MISSING_REDIS = ("redis-server/redis-cli not on PATH: run `make test`, which installs them "
                  "(apt-get install redis-server redis-tools)")


@pytest.fixture(scope="session", autouse=True)
def _no_shared_memory_left_behind():
    """Tests SIGKILL workers and Ray actors on purpose; their /dev/shm segments are left for
    the next process to sweep (cachestore.shm). Sweep them at the end, so runs do not pile up."""
    yield
    from kvmesh.cachestore.shm import segments

    if Path(segments.SHM_DIR).is_dir():
        segments.sweep_stale(older_than_s=0)


def _module_imports(package: str) -> dict[str, set[str]]:
    """Every module of an installed kvmesh package -> what it imports: the package's own
    modules by module (`from x import y` counts x.y when y is a module), others by name. Every
    import counts: top level, under TYPE_CHECKING, inside a function."""
    root = Path(importlib.import_module(package).__file__).parent
    paths = {}
    for path in root.rglob("*.py"):
        parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
        paths[".".join([package, *parts])] = path
    graph: dict[str, set[str]] = {module: set() for module in paths}
    for module, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{alias.name}" for alias in node.names]
                names = [name for name in subs if name in paths] or [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            graph[module] |= {name for name in names if name != module}
    return graph


@pytest.fixture(scope="session")
def module_imports():
    """`module_imports("kvmesh.router")`: the package's import graph (layer tests)."""
    return _module_imports


def _import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph` (module -> modules it imports), as a path; None if none."""
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> list[str] | None:
        for dep in graph.get(module, ()):
            if dep in path:
                return [*path, dep]
            if dep not in done and (cycle := walk(dep, [*path, dep])) is not None:
                return cycle
        done.add(module)
        return None

    for module in graph:
        if (cycle := walk(module, [module])) is not None:
            return cycle
    return None


@pytest.fixture(scope="session")
def import_cycle():
    """`import_cycle(graph)`: one cycle of an import graph as a path, None if it has none."""
    return _import_cycle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=timeout)
    return out.stdout


@dataclass
class RedisProcess:
    """One redis-server on 127.0.0.1:port; `kill()` / `start()` let a test take it down and
    bring it back mid-test (same port, empty data)."""

    dir: Path
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None, "already running"
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--protected-mode", "no", *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while _redis_cli(self.port, "ping").strip() != "PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def _require_redis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail(_MISSING_REDIS, pytrace=False)


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server (no persistence) on a free port; killed at teardown."""
    _require_redis()
    server = RedisProcess(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_factory(tmp_path):
    """start(*extra_args) -> a started RedisProcess with extra redis-server flags (e.g.
    "--maxmemory", "1mb"); every one is killed at teardown."""
    _require_redis()
    started: list[RedisProcess] = []

    def start(*extra_args: str) -> RedisProcess:
        server = RedisProcess(tmp_path / f"redis-{len(started)}", extra_args=extra_args)
        server.dir.mkdir()
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.kill()


@dataclass
class RedisClusterProcesses:
    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        """Startup node in the `redis+cluster://` scheme RedisTier understands."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture
def redis_cluster(tmp_path):
    """3 masters with --cluster-enabled yes on free loopback ports, joined by
    `redis-cli --cluster create`; yields once `cluster info` says cluster_state:ok."""
    _require_redis()
    nodes = []
    try:
        for i in range(3):
            node_dir = tmp_path / f"cluster{i}"
            node_dir.mkdir()
            node = RedisProcess(node_dir, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(free_port()),  # bus port; default port+10000 may not exist
                "--cluster-node-timeout", "2000"))
            nodes.append(node)
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in _redis_cli(n.port, "cluster", "info") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield RedisClusterProcesses(nodes)
    finally:
        for node in nodes:
            node.kill()


@dataclass
class PageMaker:
    """Deterministic random pages for a namespace: token ids and one payload per full page."""

    seed: int = 0

    def tokens(self, num_tokens: int, offset: int = 0) -> list[int]:
        rng = np.random.default_rng(self.seed + offset)
        return rng.integers(0, 50_000, size=num_tokens).tolist()

    def payloads(self, ns, num_pages: int, offset: int = 0) -> list[bytes]:
        rng = np.random.default_rng(10_000 + self.seed + offset)
        return [rng.integers(0, 256, size=ns.page_nbytes, dtype=np.uint8).tobytes()
                for _ in range(num_pages)]


@pytest.fixture
def pages() -> PageMaker:
    return PageMaker()
