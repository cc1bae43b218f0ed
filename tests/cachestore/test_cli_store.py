"""`kvmesh store` as a real subprocess (port 0, printed port, tiers, SIGTERM), and StoreConfig
from flags and KVMESH_STORE_* env vars."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.client.store_client import Unauthenticated
from kvmesh.cachestore.config import StoreConfig, parse_bytes
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.deploy.cli import command

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float16, page_size=2)
LISTENING = re.compile(r"^kvmesh store listening on (127\.0\.0\.1):(\d+)$")


def kvmesh(*args: str, env: dict | None = None) -> subprocess.Popen:
    exe = shutil.which("kvmesh")
    cmd = [exe] if exe else command()
    return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def test_store_subprocess_serves_and_stops_on_sigterm(tmp_path):
    proc = kvmesh("store", "--port", "0", "--cpu-bytes", "1M", "--disk-dir", str(tmp_path))
    try:
        match = LISTENING.match(proc.stdout.readline().rstrip("\n"))
        assert match, "no listening line"
        assert proc.stdout.readline().strip() == "tier cpu: capacity 1048576 bytes, 0 pages"
        assert proc.stdout.readline().strip().startswith("tier disk: capacity 68719476736 bytes")
        with StoreClient(f"{match.group(1)}:{match.group(2)}") as client:
            kv = torch.arange(24, dtype=torch.float16).reshape(1, 2, 3, 1, 4)
            assert client.put([1, 2, 3], kv, NS) == 1
            got = client.get_closest([1, 2, 3], NS)
            assert got.num_tokens == 2 and torch.equal(got.kv, kv[:, :, :2])
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == "kvmesh store stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_token_from_env_is_enforced():
    proc = kvmesh("store", "--port", "0", env={"KVMESH_STORE_TOKEN": "envtoken",
                                               "KVMESH_STORE_CPU_BYTES": "2M"})
    try:
        match = LISTENING.match(proc.stdout.readline().rstrip("\n"))
        assert match
        assert proc.stdout.readline().strip() == "tier cpu: capacity 2097152 bytes, 0 pages"
        target = f"{match.group(1)}:{match.group(2)}"
        with StoreClient(target) as client, pytest.raises(Unauthenticated):
            client.stats()
        with StoreClient(target, token="envtoken") as client:
            assert [s.name for s in client.stats()] == ["cpu"]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_in_use_exits_1():
    from kvmesh.cachestore.rpc.server import serve_store

    with serve_store(StoreConfig(port=0)) as taken:
        proc = kvmesh("store", "--port", str(taken.port))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"kvmesh store: cannot listen on 127.0.0.1:{taken.port}" in err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("args, message", [
    (["--cpu-bytes", "0"], "cpu_bytes must be positive, got 0"),
    (["--port", "70000"], r"port must be in \[0, 65535\], got 70000"),
    (["--redis-url", "http://x"], "redis_url must be a redis:// URL"),
    (["--tls-cert", "/nonexistent.pem"], "tls_cert and tls_key go together"),
])
def test_bad_flags_exit_2_with_a_clear_message(args, message, capsys, monkeypatch):
    from kvmesh.deploy.cli import main

    for name in [k for k in os.environ if k.startswith("KVMESH_STORE_")]:
        monkeypatch.delenv(name)
    assert main(["store", *args]) == 2  # in-process: the same parser and config path
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_config_sources_precedence():
    env = {"KVMESH_STORE_PORT": "5555", "KVMESH_STORE_CPU_BYTES": "1.5G",
           "KVMESH_STORE_REDIS_URL": "redis://127.0.0.1:1/0", "KVMESH_STORE_REDIS_TTL": "60"}
    config = StoreConfig.from_sources({"port": 6000, "disk_dir": None}, env=env)
    assert (config.port, config.cpu_bytes, config.redis_url, config.redis_ttl) == (
        6000, 3 << 29, "redis://127.0.0.1:1/0", 60)
    assert config.disk_dir is None and config.token is None and config.host == "127.0.0.1"
    with pytest.raises(InvalidConfig, match="KVMESH_STORE_MAX_WORKERS='many' is not an integer"):
        StoreConfig.from_sources({}, env={"KVMESH_STORE_MAX_WORKERS": "many"})
    with pytest.raises(InvalidConfig, match="remote must be HOST:PORT"):
        StoreConfig(remote="nohost")
    with pytest.raises(InvalidConfig, match="token must not be empty"):
        StoreConfig(token="")


@pytest.mark.parametrize("text, nbytes", [("4096", 4096), ("512M", 512 << 20), ("4G", 4 << 30),
                                          ("64KiB", 64 << 10), ("1.5g", 3 << 29)])
def test_parse_bytes(text, nbytes):
    assert parse_bytes(text) == nbytes
