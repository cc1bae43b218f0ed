"""Packaging: the repository's folders install under the one import root `kvmesh`.

`cachestore/` becomes `kvmesh.cachestore`, `workers/` `kvmesh.workers`, and so on (setuptools
`package-dir`); `kvmesh/` holds the root package and, generated on every build (wheel, sdist,
editable install) from proto/kvmesh/v1/*.proto, `kvmesh.v1`. Generated code is never committed.
"""

import os
import runpy

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Loaded by path: the repository root must not go on sys.path, where its `kernels/` folder
# would shadow Hugging Face's `kernels` (whose setuptools plugin loads during this build).
build_proto = runpy.run_path(os.path.join(ROOT, "build_proto.py"))["build_proto"]

PARTS = ("cachestore", "workers", "router", "kernels", "deploy", "loadgen")


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = ["kvmesh", "kvmesh.v1"]
    package_dir = {"kvmesh": "kvmesh"}
    for part in PARTS:
        package_dir[f"kvmesh.{part}"] = part
        packages.append(f"kvmesh.{part}")
        packages += [f"kvmesh.{part}.{sub}" for sub in find_packages(os.path.join(ROOT, part))]
    return packages, package_dir


build_proto()
packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
