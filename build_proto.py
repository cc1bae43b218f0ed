"""Generate Python gRPC code for proto/kvmesh/v1 into ./kvmesh/v1, the package
`kvmesh.v1` (ignored by git).

Run by setup.py at install time and by `make proto`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def build_proto() -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject build-system.requires)

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={ROOT}",
            f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", *protos]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    (ROOT / "kvmesh" / "v1" / "__init__.py").touch()


if __name__ == "__main__":
    build_proto()
