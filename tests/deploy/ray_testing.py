"""Helpers for the Ray deployment tests (tests/deploy/test_ray.py): a Ray node per
`ray start --block` process, the kvmesh CLI, and the router's HTTP endpoints."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import psutil

from kvmesh.deploy.cli import command

PAGE_SIZE = 16
# 6 full pages + 3 tokens; ids inside SmolLM2's vocabulary, no special tokens
PROMPT_IDS = [(7 * i + 300) % 4000 + 200 for i in range(6 * PAGE_SIZE + 3)]
API_KEY = "test-key"
WORKER_ARGS = "--kv-cache-bytes 33554432 --max-num-seqs 4 --max-model-len 512"


@dataclass
class RayHead:
    address: str
    process: subprocess.Popen


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ray_start(args: list[str], log_path) -> subprocess.Popen:
    """`ray start --block ...` in its own session; returns once the node is up."""
    agent, = free_ports(1)
    log = open(log_path, "w")
    process = subprocess.Popen(
        ["ray", "start", "--block", *args, "--dashboard-agent-listen-port", str(agent),
         "--object-store-memory", "100000000", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 90
    while "block forever" not in open(log_path).read():
        assert process.poll() is None, open(log_path).read()
        assert time.monotonic() < deadline, f"ray start did not come up: {open(log_path).read()}"
        time.sleep(0.5)
    return process


def ray_stop(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops the Ray processes it started), then SIGKILL any
    of its descendants still there, by pid. Never `ray stop`: it stops every Ray on the machine."""
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def kvmesh(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True,
                          text=True, timeout=timeout)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def complete(url: str, prompt: list[int] | str, api_key: str | None = None) -> dict:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.post(f"{url}/v1/completions", timeout=120, headers=headers, json={
        "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def metric(url: str, name: str, worker: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf'^{re.escape(name)}{{worker="{re.escape(worker)}"}} (\S+)$', text, re.M)
    return None if match is None else float(match.group(1))


def routed_to(url: str, worker: str) -> float:
    """Requests the router has sent to `worker` (any routing reason)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kvmesh:routing_decisions_total{")
               and f'worker="{worker}"' in line)


def health(url: str) -> dict[str, bool]:
    return httpx.get(f"{url}/health", timeout=10).json()["workers"]


def all_healthy(url: str) -> bool:
    try:
        return all(health(url).values())
    except httpx.TransportError:  # not listening (yet)
        return False
