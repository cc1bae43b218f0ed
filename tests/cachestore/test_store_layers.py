"""cachestore's imports follow its layers (the subpackages' docstrings), with no cycle: every
import counts, at top level, under TYPE_CHECKING or inside a function."""

from __future__ import annotations

PKG = "kvmesh.cachestore"
BOTTOM = {"keys", "codec", "codec_batch", "bulk_pool", "errors", "page_mac", "malloc", "config",
          "shm.segments"}
# cli.py and the package root: on top
LAYERS = {"tiers": 1, "store": 2, "shm": 3, "dataplane": 3, "rpc": 4, "client": 4}


def _own_imports(module_imports) -> dict[str, set[str]]:
    """module -> the cachestore modules it imports."""
    graph = module_imports(PKG)
    return {module: {dep for dep in deps if dep in graph} for module, deps in graph.items()}


def _layer(module: str) -> int:
    name = module[len(PKG) + 1 :]
    if name in BOTTOM:
        return 0
    return LAYERS.get(name.split(".")[0], 5)


def test_imports_go_down_the_layers_only(module_imports):
    upward = sorted(f"{m} -> {d}" for m, deps in _own_imports(module_imports).items() for d in deps
                    if _layer(d) > _layer(m))
    assert upward == []


def test_no_import_cycle(module_imports, import_cycle):
    graph = _own_imports(module_imports)
    assert import_cycle(graph) is None


def test_the_client_uses_only_the_shared_wire_forms_of_rpc(module_imports):
    shared = {f"{PKG}.rpc.{name}" for name in ("wire", "lookup_wire", "status")}
    reached = sorted(f"{m} -> {d}" for m, deps in _own_imports(module_imports).items()
                     if m.startswith(f"{PKG}.client") for d in deps
                     if d.startswith(f"{PKG}.rpc") and d not in shared)
    assert reached == []
