"""The router's imports follow its package docstrings, with no cycle: every import counts, at
top level, under TYPE_CHECKING or inside a function."""

from __future__ import annotations

PKG = "kvmesh.router"


def _offending(graph: dict[str, set[str]], modules: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith(modules)
                  for d in deps if d.startswith(forbidden))


def test_router_talks_to_workers_over_grpc_only(module_imports):
    forbidden = ("kvmesh.workers", "kvmesh.deploy", "kvmesh.loadgen")
    assert _offending(module_imports(PKG), PKG, forbidden) == []


def test_routing_never_imports_the_front_or_the_service(module_imports):
    forbidden = (f"{PKG}.http", f"{PKG}.service", f"{PKG}.cli", "aiohttp")
    assert _offending(module_imports(PKG), f"{PKG}.routing", forbidden) == []


def test_the_core_never_imports_the_http_front(module_imports):
    """router.service gets checked requests as router.requests types, never from router.http."""
    assert _offending(module_imports(PKG), f"{PKG}.service", (f"{PKG}.http", "aiohttp")) == []


def test_policy_and_index_are_pure(module_imports):
    """No I/O, no threads, nothing of kvmesh but the router's errors (and policy: the index)."""
    graph = module_imports(PKG)
    for name in ("policy", "index"):
        deps = graph[f"{PKG}.routing.{name}"]
        assert {d for d in deps if d.startswith("kvmesh")} <= {f"{PKG}.errors",
                                                                f"{PKG}.routing.index"}
        io = ("grpc", "aiohttp", "asyncio", "socket", "threading", "logging", "os")
        assert [d for d in deps if d.startswith(io)] == []


def test_only_the_app_and_the_cli_import_aiohttp(module_imports):
    graph = module_imports(PKG)
    users = sorted(m for m, deps in graph.items() if any(d.startswith("aiohttp") for d in deps))
    assert users == [f"{PKG}.cli", f"{PKG}.http.app"]


def test_no_import_cycle(module_imports, import_cycle):
    graph = {m: {d for d in deps if d.startswith(PKG)} for m, deps in module_imports(PKG).items()}
    assert import_cycle(graph) is None
