"""What a fresh install gets: kvmesh builds as an sdist and a wheel, the wheel installs one import
root (`kvmesh`) that no other installed distribution also provides, it imports and runs from
outside the repository beside transformers (whose `kernels` dependency once collided with ours),
and `kvmesh serve` answers from the repository root as from any other folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from serve_stack import Stack

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("cachestore", "workers", "router", "kernels", "deploy")
_SKIP_NAMES = shutil.ignore_patterns(".git", ".venv", ".whl", "build", "dist", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".ruff_cache", "*.png")


def _skip_copy(folder: str, names: list[str]) -> set[str]:
    """What a fresh clone lacks: build outputs, caches, and the generated `kvmesh/v1`."""
    skipped = _SKIP_NAMES(folder, names)
    if Path(folder) == ROOT / "kvmesh":
        skipped.add("v1")
    return skipped


def _run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """sdist from a copy of the source as a fresh clone has it (no generated code), then the
    wheel from the unpacked sdist: both build paths a user or an index takes. No build isolation:
    the build uses this environment's locked setuptools and grpcio-tools, and needs no network."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_skip_copy)
    _run([sys.executable, "-P", "-c", "import sys, setuptools.build_meta as b; "
          "print(b.build_sdist(sys.argv[1]))", str(tmp / "sdist")], cwd=src)
    (sdist,) = (tmp / "sdist").glob("kvmesh-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        assert any(n.endswith("/proto/kvmesh/v1/store.proto") for n in names)  # rebuilt from it
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "wheel"), str(unpacked)], cwd=tmp)
    (whl,) = (tmp / "wheel").glob("kvmesh-*.whl")
    return whl


def _top_level_names(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
    return {re.sub(r"\.py$", "", t) for t in tops if not t.endswith((".dist-info", ".data"))}


def test_wheel_installs_only_the_kvmesh_root(wheel):
    assert _top_level_names(wheel) == {"kvmesh"}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for part in PARTS:
        assert f"kvmesh/{part}/__init__.py" in names
    assert {"kvmesh/__init__.py", "kvmesh/v1/store_pb2.py", "kvmesh/v1/store_pb2_grpc.py",
            "kvmesh/cachestore/tiers/__init__.py", "kvmesh/workers/models/__init__.py"} <= names


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A throwaway venv that sees this environment's packages (no torch download) and holds
    only the wheel's kvmesh, installed with --no-deps."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], cwd=path.parent)
    if sys.prefix != sys.base_prefix:  # inside a venv: --system-site-packages skips its packages
        purelib = _run([str(path / "bin" / "python"), "-c",
                        "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path)
        outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                 *site.getsitepackages()}
        Path(purelib.strip(), "_kvmesh_test_outer.pth").write_text("\n".join(sorted(outer)) + "\n")
    _run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=path.parent)
    return path


def test_wheel_imports_beside_transformers_from_another_folder(venv, tmp_path):
    code = ("import json, kvmesh, kvmesh.kernels, kvmesh.workers.engine.engine;"
            "import transformers.activations;"
            "from kvmesh import Namespace, StoreClient;"
            "from kvmesh.cachestore import StoreClient as S2;"
            "assert S2 is StoreClient and Namespace.__module__ == 'kvmesh.cachestore.keys';"
            "print(json.dumps([kvmesh.__file__, kvmesh.kernels.__file__,"
            " kvmesh.workers.engine.engine.__file__]))")
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path)
    for path in json.loads(out.strip().splitlines()[-1]):
        assert Path(path).resolve().is_relative_to(venv.resolve()), path


def test_no_installed_distribution_shares_a_top_level_name(wheel, venv, tmp_path):
    code = ("import json, importlib.metadata as m;"
            "print(json.dumps({k: sorted(set(v)) for k, v in m.packages_distributions().items()}))")
    providers = json.loads(_run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path))
    for name in _top_level_names(wheel):
        others = [d for d in providers.get(name, []) if d.lower() != "kvmesh"]
        assert not others, f"top-level name {name!r} is also installed by {others}"
    for part in PARTS:  # the repository's folder names are not installed as top-level names
        assert "kvmesh" not in [d.lower() for d in providers.get(part, [])], part


def test_wheel_store_starts_from_another_folder(venv, tmp_path):
    proc = subprocess.Popen([str(venv / "bin" / "kvmesh"), "store", "--port", "0", "--cpu-bytes",
                             "1M", "--disk-dir", str(tmp_path / "disk")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert re.match(r"^kvmesh store listening on 127\.0\.0\.1:\d+$", line.strip()), (
            line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
    finally:
        proc.terminate()
        proc.wait(30)


def _kvmesh_script() -> list[str]:
    script = Path(sys.executable).parent / "kvmesh"
    assert script.exists(), f"no kvmesh console script beside {sys.executable}"
    return [str(script)]


@pytest.mark.parametrize("where", ["repo root", "another folder"])
def test_serve_answers_a_chat_from(where, tmp_path):
    """The console script, as a user types it, from the repository root (where the `kernels/`
    folder sits on the working directory) and from elsewhere."""
    cwd = ROOT if where == "repo root" else tmp_path
    stack = Stack(tmp_path / "data", "--workers", "1", cmd=_kvmesh_script(), cwd=cwd)
    try:
        stack.wait_ready(300)
        deadline = time.monotonic() + 120
        while True:
            reply = httpx.post(f"http://127.0.0.1:{stack.port}/v1/chat/completions", timeout=120,
                               json={"messages": [{"role": "user", "content": "Hi"}],
                                     "max_tokens": 4})
            if reply.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the worker is still coming up
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        stack.close()
    assert os.path.isdir(tmp_path / "data")
