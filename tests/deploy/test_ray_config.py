"""RayDeployConfig checks and the exact command lines it gives each role; CLI errors."""

from __future__ import annotations

import socket
import subprocess

import pytest

from kvmesh.deploy.cli import command
from kvmesh.deploy.errors import RayConfigError
from kvmesh.deploy.ray_actors import advertised_address
from kvmesh.deploy.ray_config import RayDeployConfig


def test_role_command_lines():
    config = RayDeployConfig(num_workers=2, store_port=7001, worker_base_port=7100,
                             router_port=9000, redis_url="redis://r:6379/0",
                             store_cpu_bytes=1 << 20, api_key="k", token="t",
                             worker_host_tier_bytes=1 << 22,
                             worker_args=("--kv-cache-bytes", "1000"))
    assert config.store_argv() == ["--host", "0.0.0.0", "--port", "7001", "--cpu-bytes",
                                   "1048576", "--redis-url", "redis://r:6379/0"]
    assert config.worker_argv(1, "10.0.0.1:7001") == [
        "--device", "cpu", "--store", "10.0.0.1:7001", "--host", "0.0.0.0", "--port", "7101",
        "--host-tier-bytes", "4194304", "--kv-cache-bytes", "1000"]
    assert config.router_argv(["a:1", "b:2"], "s:3") == [
        "--worker", "a:1", "--worker", "b:2", "--store", "s:3", "--host", "0.0.0.0",
        "--port", "9000"]
    # secrets travel in each role's environment, never its argv
    store_env = config.role_env("store")
    assert store_env["KVMESH_STORE_TOKEN"] == "t"
    # Redis is shared: its pages carry a MAC keyed from the tenant secret (stable across deploys)
    again = RayDeployConfig(redis_url="redis://r:6379/0", tenant_secret=config.tenant_secret)
    assert len(store_env["KVMESH_STORE_REDIS_MAC_KEY"]) == 64
    assert again.role_env("store")["KVMESH_STORE_REDIS_MAC_KEY"] == (
        store_env["KVMESH_STORE_REDIS_MAC_KEY"])
    assert "KVMESH_STORE_REDIS_MAC_KEY" not in RayDeployConfig().role_env("store")
    assert config.role_env("worker") == {"KVMESH_WORKER_TOKEN": "t",
                                         "KVMESH_WORKER_STORE_TOKEN": "t"}
    router_env = config.role_env("router")
    assert router_env["KVMESH_ROUTER_API_KEYS"] == "k=k"
    assert router_env["KVMESH_ROUTER_WORKER_TOKEN"] == "t"
    assert len(router_env["KVMESH_ROUTER_SECRET"]) >= 32  # random per deployment


def test_disaggregated_workers_get_their_role_and_the_router_both_lists():
    config = RayDeployConfig(num_prefill_workers=1, num_decode_workers=2, worker_base_port=7100,
                             token="t")
    assert config.worker_roles == ["prefill", "decode", "decode"]
    assert config.worker_actor_names == ["kvmesh-prefill-worker-0", "kvmesh-decode-worker-0",
                                         "kvmesh-decode-worker-1"]
    assert config.worker_argv(0, "s:1") == ["--device", "cpu", "--store", "s:1", "--host",
                                            "0.0.0.0", "--port", "7100", "--role", "prefill"]
    assert config.worker_argv(2, "s:1")[6:] == ["--port", "7102", "--role", "decode"]
    assert config.router_argv(["p:1", "d:1", "d:2"], "s:1")[:6] == [
        "--prefill-worker", "p:1", "--decode-worker", "d:1", "--decode-worker", "d:2"]
    # colocated workers keep the worker's default role and the router's plain --worker
    assert RayDeployConfig().worker_actor_names == ["kvmesh-worker-0"]
    assert "--role" not in RayDeployConfig().worker_argv(0, "s:1")


def test_workers_sharing_a_gpu_split_its_memory():
    half = RayDeployConfig(num_prefill_workers=1, num_decode_workers=1, num_gpus_per_worker=0.5)
    argv = half.worker_argv(1, "s:1")
    assert argv[:2] == ["--device", "cuda"]
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45"  # half of 0.9
    whole = RayDeployConfig(num_gpus_per_worker=1).worker_argv(0, "s:1")
    assert "--gpu-memory-utilization" not in whole


def test_a_deployment_without_a_token_gets_a_random_one():
    first, second = RayDeployConfig(), RayDeployConfig()
    assert first.token and second.token and first.token != second.token
    assert first.role_env("worker")["KVMESH_WORKER_TOKEN"] == first.token


def test_gpu_workers_run_on_cuda_and_model_reaches_router():
    config = RayDeployConfig(num_gpus_per_worker=1, num_cpus_per_worker=0, model="/m.gguf")
    assert config.device == "cuda"
    assert config.worker_argv(0, "s:1")[:2] == ["--device", "cuda"]
    assert "/m.gguf" in config.router_argv(["w:1"], "s:1")
    # the worker's alias for the bundled model is the router's default: not passed on
    assert "--model" not in RayDeployConfig(model="smollm2").router_argv(["w:1"], "s:1")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_workers": 0}, "--workers"),
    ({"num_workers": 1, "num_prefill_workers": 1, "num_decode_workers": 1}, "exclude"),
    ({"num_prefill_workers": 1}, "go together"),
    ({"num_decode_workers": -1}, ">= 0"),
    ({"worker_base_port": 65534, "num_prefill_workers": 1, "num_decode_workers": 2},
     "--worker-port"),
    ({"num_cpus_per_worker": 0, "num_gpus_per_worker": 0}, "reserve"),
    ({"num_gpus_per_worker": 2}, "one device"),
    ({"store_port": 0}, "--store-port"),
    ({"router_port": 70000}, "--port"),
    ({"worker_base_port": 65535, "num_workers": 2}, "--worker-port"),
    ({"store_port": 8000, "router_port": 8000}, "different ports"),
    ({"worker_base_port": 8000, "router_port": 8001, "num_workers": 3}, "overlap"),
    ({"max_restarts": -1}, "--max-restarts"),
    ({"worker_host_tier_bytes": -1}, "--host-tier-bytes"),
    ({"ready_timeout_s": 0}, "--timeout"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(RayConfigError, match=message):
        RayDeployConfig(**kwargs)


def test_advertised_address_uses_node_ip_for_any_host():
    assert advertised_address("0.0.0.0:50100", "10.1.2.3") == "10.1.2.3:50100"
    assert advertised_address("[::]:8000", "10.1.2.3") == "10.1.2.3:8000"
    assert advertised_address("127.0.0.1:8000", "10.1.2.3") == "127.0.0.1:8000"


def test_cli_rejects_bad_flags_with_a_clear_message():
    out = subprocess.run([*command(), "ray", "deploy", "--workers", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "kvmesh ray deploy: --workers must be at least 1, got 0"
    assert out.stdout == ""
    out = subprocess.run([*command(), "ray", "deploy", "--workers", "2", "--prefill-workers",
                          "1", "--decode-workers", "1"], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stderr.strip()) == (
        2, "kvmesh ray deploy: --workers and --prefill-workers/--decode-workers exclude each "
           "other: give either colocated or disaggregated workers")


def test_unreachable_cluster_fails_fast_with_a_clear_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it once closed
    for action in ("deploy", "status", "down"):
        out = subprocess.run([*command(), "ray", action, "--address",
                              f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert out.stderr.startswith(
            f"kvmesh ray {action}: cannot reach the Ray cluster at 127.0.0.1:{port}: ")


def test_flag_defaults_come_from_the_environment(monkeypatch):
    from kvmesh.deploy.cli import build_parser

    monkeypatch.setenv("KVMESH_RAY_WORKERS", "3")
    monkeypatch.setenv("KVMESH_RAY_NUM_GPUS_PER_WORKER", "1")
    monkeypatch.setenv("KVMESH_RAY_REDIS_URL", "redis://r:6379/0")
    args = build_parser(["ray", "deploy"]).parse_args(["ray", "deploy"])
    assert (args.workers, args.num_gpus_per_worker, args.redis_url) == (3, 1.0, "redis://r:6379/0")
    args = build_parser(["ray", "deploy"]).parse_args(["ray", "deploy", "--workers", "4"])
    assert args.workers == 4  # a flag wins over the environment
    monkeypatch.delenv("KVMESH_RAY_WORKERS")
    monkeypatch.setenv("KVMESH_RAY_PREFILL_WORKERS", "1")
    monkeypatch.setenv("KVMESH_RAY_DECODE_WORKERS", "2")
    args = build_parser(["ray", "deploy"]).parse_args(["ray", "deploy"])
    assert (args.workers, args.prefill_workers, args.decode_workers) == (None, 1, 2)
    monkeypatch.setenv("KVMESH_RAY_WORKERS", "many")
    with pytest.raises(SystemExit) as exit_info:
        build_parser(["ray", "deploy"]).parse_args(["ray", "deploy"])
    assert exit_info.value.code == 2
