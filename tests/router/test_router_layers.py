"""The router's imports follow its package docstrings, with no cycle: every import counts, at
top level, under TYPE_CHECKING or inside a function."""

from __future__ import annotations

import ast
import pathlib

import kvmesh.router

ROOT = pathlib.Path(kvmesh.router.__file__).parent
PKG = "kvmesh.router"


def _imports() -> dict[str, set[str]]:
    """router module -> every module it imports (router's own by module, others by name)."""
    paths = {}
    for path in ROOT.rglob("*.py"):
        parts = [p for p in path.relative_to(ROOT).with_suffix("").parts if p != "__init__"]
        paths[".".join([PKG, *parts])] = path
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


def _offending(graph: dict[str, set[str]], modules: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith(modules)
                  for d in deps if d.startswith(forbidden))


def test_router_talks_to_workers_over_grpc_only():
    forbidden = ("kvmesh.workers", "kvmesh.deploy", "kvmesh.loadgen")
    assert _offending(_imports(), PKG, forbidden) == []


def test_routing_never_imports_the_front_or_the_service():
    forbidden = (f"{PKG}.http", f"{PKG}.service", f"{PKG}.cli", "aiohttp")
    assert _offending(_imports(), f"{PKG}.routing", forbidden) == []


def test_the_core_never_imports_the_http_front():
    """router.service gets checked requests as router.requests types, never from router.http."""
    assert _offending(_imports(), f"{PKG}.service", (f"{PKG}.http", "aiohttp")) == []


def test_policy_and_index_are_pure():
    """No I/O, no threads, nothing of kvmesh but the router's errors (and policy: the index)."""
    graph = _imports()
    for name in ("policy", "index"):
        deps = graph[f"{PKG}.routing.{name}"]
        assert {d for d in deps if d.startswith("kvmesh")} <= {f"{PKG}.errors",
                                                                f"{PKG}.routing.index"}
        io = ("grpc", "aiohttp", "asyncio", "socket", "threading", "logging", "os")
        assert [d for d in deps if d.startswith(io)] == []


def test_only_the_app_and_the_cli_import_aiohttp():
    graph = _imports()
    users = sorted(m for m, deps in graph.items() if any(d.startswith("aiohttp") for d in deps))
    assert users == [f"{PKG}.cli", f"{PKG}.http.app"]


def test_no_import_cycle():
    graph = {m: {d for d in deps if d.startswith(PKG)} for m, deps in _imports().items()}
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        for dep in graph[module]:
            assert dep not in path, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in done:
                walk(dep, [*path, dep])
        done.add(module)

    for module in graph:
        walk(module, [module])
