"""The `kvmesh` console script: one subcommand per role.

Each role's module defines `register(subparsers)`, which adds its parser and sets
`func=handler(args) -> int`. Modules are imported lazily so `kvmesh store` does not load torch
models or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining register(subparsers)
COMMANDS: dict[str, str] = {
    "store": "kvmesh.cachestore.cli",
    "worker": "kvmesh.workers.cli",
    "router": "kvmesh.router.cli",
    "serve": "kvmesh.deploy.local",
    "bench": "kvmesh.loadgen.serve",
    "ray": "kvmesh.deploy.ray_cli",
}


def command(*args: str) -> list[str]:
    """argv that runs `kvmesh *args` in a new process with this interpreter.

    `-P`: the new process must not put its working directory on sys.path. The repository's
    folders (`kernels/`, `workers/`, ...) are importable by those names from its root, and
    `kernels` is also Hugging Face's package, which transformers imports; kvmesh itself is only
    ever imported as `kvmesh.*` from the installed package.
    """
    return [sys.executable, "-P", "-m", "kvmesh.deploy.cli", *args]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, module_name in COMMANDS.items():
        if wanted is not None and name != wanted:
            subparsers.add_parser(name)  # listed in help; only the chosen one is imported
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # role not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
