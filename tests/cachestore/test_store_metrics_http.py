"""`kvmesh store --metrics-port`: a real store process serves its tiers' counters as Prometheus
text at /metrics, behind the store's token (or a scrape-only one), on 127.0.0.1 by default."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess

import httpx
import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.rpc.metrics_http import StoreMetricsConfig
from kvmesh.deploy.cli import command

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float16, page_size=2)
LISTENING = re.compile(r"^kvmesh store listening on (127\.0\.0\.1:\d+)$")
METRICS = re.compile(r"^kvmesh store metrics on (http://127\.0\.0\.1:\d+/metrics)$")


def _store(tmp_path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    exe = shutil.which("kvmesh")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_STORE_")}
    return subprocess.Popen([*([exe] if exe else command()), "store", "--port", "0",
                             "--cpu-bytes", "1M", "--disk-dir", str(tmp_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**clean, **env})


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out


def test_tier_counters_behind_the_store_token(tmp_path):
    proc = _store(tmp_path, "--metrics-port", "0", env={"KVMESH_STORE_TOKEN": "internal"})
    try:
        target = LISTENING.match(proc.stdout.readline().rstrip("\n")).group(1)
        url = METRICS.match(proc.stdout.readline().rstrip("\n")).group(1)
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": "Bearer internal"}
        assert httpx.get(url.replace("/metrics", "/other"), headers=auth).status_code == 404
        with StoreClient(target, token="internal") as client:
            kv = torch.arange(40, dtype=torch.float16).reshape(1, 2, 5, 1, 4)
            assert client.put([1, 2, 3, 4, 5], kv, NS) == 2
            assert client.get_closest([1, 2, 3, 4, 5], NS).num_tokens == 4
            assert client.get_closest([9, 9, 9], NS) is None
            stats = {s.name: s for s in client.stats()}
        reply = httpx.get(url, headers=auth)
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain")
        samples = _samples(reply.text)
        for tier in ("cpu", "disk"):
            s = stats[tier]
            assert samples[f'kvmesh:store_pages{{tier="{tier}"}}'] == s.num_pages
            assert samples[f'kvmesh:store_used_bytes{{tier="{tier}"}}'] == s.used_bytes
            assert samples[f'kvmesh:store_capacity_bytes{{tier="{tier}"}}'] == s.capacity_bytes
            assert samples[f'kvmesh:store_hits_total{{tier="{tier}"}}'] == s.hits
            assert samples[f'kvmesh:store_misses_total{{tier="{tier}"}}'] == s.misses
            assert samples[f'kvmesh:store_tier_available{{tier="{tier}"}}'] == 1.0
        assert samples['kvmesh:store_pages{tier="cpu"}'] == 2
        assert samples['kvmesh:store_hits_total{tier="cpu"}'] >= 2
        assert _stop(proc).rstrip().endswith("kvmesh store stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_scrape_token_replaces_the_internal_one_and_no_port_by_default(tmp_path):
    proc = _store(tmp_path, "--metrics-port", "0",
                  env={"KVMESH_STORE_TOKEN": "internal", "KVMESH_STORE_METRICS_TOKEN": "scrape"})
    try:
        proc.stdout.readline()
        url = METRICS.match(proc.stdout.readline().rstrip("\n")).group(1)
        assert httpx.get(url, headers={"Authorization": "Bearer internal"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "bearer scrape"}).status_code == 200
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = _store(tmp_path / "b", env={})
    try:
        assert LISTENING.match(proc.stdout.readline().rstrip("\n"))
        assert "metrics" not in _stop(proc)  # no metrics line: no port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_open_metrics_port_off_this_host_is_refused(tmp_path):
    proc = _store(tmp_path, "--metrics-port", "0", "--metrics-host", "0.0.0.0", env={})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert "KVMESH_STORE_METRICS_TOKEN" in err and "Traceback" not in err
    with pytest.raises(InvalidConfig, match="metrics_port must be in"):
        StoreMetricsConfig.from_sources({"metrics_port": 70000}, StoreConfig())
    loopback = StoreMetricsConfig.from_sources({}, StoreConfig(),
                                               env={"KVMESH_STORE_METRICS_PORT": "0"})
    assert (loopback.port, loopback.host, loopback.token) == (0, "127.0.0.1", None)


def test_tls_when_the_store_speaks_tls(tmp_path):
    from test_grpc_auth import _self_signed

    from kvmesh.cachestore.rpc.metrics_http import StoreMetricsServer
    from kvmesh.cachestore.rpc.server import serve_store

    cert, key = _self_signed(tmp_path)
    config = StoreConfig(port=0, cpu_bytes=1 << 20, token="t", tls_cert=cert, tls_key=key)
    with serve_store(config) as store:
        metrics = StoreMetricsServer(StoreMetricsConfig.from_sources({"metrics_port": 0},
                                                                     config), store.store)
        try:
            assert metrics.url.startswith("https://127.0.0.1:")
            reply = httpx.get(metrics.url, verify=ssl.create_default_context(cafile=cert),
                              headers={"Authorization": "Bearer t"})
            assert _samples(reply.text)['kvmesh:store_pages{tier="cpu"}'] == 0
            with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer
                httpx.get(metrics.url.replace("https", "http"), timeout=5)
        finally:
            metrics.stop()
