"""Compiles proto/kvmesh/v1/*.proto into the generated package `kvmesh.v1` on every build
(wheel, sdist, editable install). Generated code is never committed."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_proto import build_proto  # noqa: E402

build_proto()
setup()
