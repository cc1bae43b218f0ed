"""Time to serve and failover times of `kvmesh ray deploy` on a local Ray head, with
`kvmesh serve` (the same store + workers + router as plain child processes) as the peer.

    python3 benchmarks/ray_deploy_bench.py [--workers 2] [--repeats 1]

Starts its own `ray start --head --block` on free ports and stops it (by pid) at the end.
Prints a markdown table: seconds from launch to `kvmesh serving on`, to the first completion,
and for Ray: from `ray.kill(worker)` to the router marking it down, to the restarted worker
listening, to the router taking it back; then `kvmesh ray down`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

from kvmesh.deploy.cli import command

WORKER_ARGS = "--kv-cache-bytes 33554432 --max-num-seqs 4 --max-model-len 512"
PROMPT = [(7 * i + 300) % 4000 + 200 for i in range(99)]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for(predicate, timeout: float = 300.0, period: float = 0.1) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError
        time.sleep(period)
    return time.monotonic() - start


def complete(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    r.raise_for_status()


def health(url: str) -> dict[str, bool]:
    try:
        return httpx.get(f"{url}/health", timeout=5).json()["workers"]
    except httpx.HTTPError:
        return {}


def launch(argv: list[str]) -> tuple[subprocess.Popen, str, float]:
    """Start a kvmesh command; returns it, its router URL and seconds to `kvmesh serving on`."""
    start = time.monotonic()
    proc = subprocess.Popen(command(*argv), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("kvmesh serving on "):
            return proc, line.split()[-1], time.monotonic() - start
    raise RuntimeError(f"{argv[0]} exited with {proc.wait()} before serving")


def bench_local(num_workers: int) -> dict[str, float]:
    (port,) = free_ports(1)
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url, ready_s = launch(["serve", "--port", str(port), "--workers", str(num_workers),
                                     "--data-dir", data_dir, "--worker-arg=--kv-cache-bytes",
                                     "--worker-arg=33554432"])
        start = time.monotonic()
        complete(url)
        first_s = ready_s + time.monotonic() - start
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        proc.wait(60)
        return {"serving": ready_s, "first answer": first_s, "down": time.monotonic() - start}


def start_ray_head() -> tuple[subprocess.Popen, str]:
    gcs, client, dashboard, agent = free_ports(4)
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
         "--include-dashboard=false", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--object-store-memory", "100000000", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "block forever" in line:
            break
    return proc, f"127.0.0.1:{gcs}"


def stop_ray_head(proc: subprocess.Popen) -> None:
    descendants = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def bench_ray(address: str, num_workers: int) -> dict[str, float]:
    import ray

    store_port, router_port, worker_port = free_ports(3)
    proc, url, ready_s = launch(["ray", "deploy", "--address", address, "--workers",
                                 str(num_workers), "--port", str(router_port), "--store-port",
                                 str(store_port), "--worker-port", str(worker_port),
                                 "--worker-args", WORKER_ARGS])
    proc.wait(60)
    start = time.monotonic()
    complete(url)
    result = {"serving": ready_s, "first answer": ready_s + time.monotonic() - start}
    wait_for(lambda: all(health(url).values()) and len(health(url)) == num_workers)
    ray.init(address=address, namespace="kvmesh", log_to_driver=False)
    actor = ray.get_actor("kvmesh-worker-0")
    victim = ray.get(actor.info.remote())["address"]
    start = time.monotonic()
    ray.kill(actor, no_restart=False)
    result["kill → router marks down"] = wait_for(lambda: health(url).get(victim) is False)
    ray.get(actor.info.remote(), timeout=300)
    result["kill → worker listening again"] = time.monotonic() - start
    wait_for(lambda: health(url).get(victim) is True)
    result["kill → router takes it back"] = time.monotonic() - start
    ray.shutdown()
    start = time.monotonic()
    subprocess.run([*command(), "ray", "down", "--address", address],
                   check=True, capture_output=True, timeout=120)
    result["down"] = time.monotonic() - start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, "
          f"{args.workers} CPU workers (SmolLM2-135M)", flush=True)
    rows: list[tuple[str, str, float]] = []
    head, address = start_ray_head()
    try:
        for _ in range(args.repeats):
            rows += [("kvmesh serve", k, v) for k, v in bench_local(args.workers).items()]
            rows += [("kvmesh ray deploy", k, v) for k, v in bench_ray(address,
                                                                     args.workers).items()]
    finally:
        stop_ray_head(head)
    print("| launcher | step | seconds |\n|---|---|---|")
    for launcher, step, seconds in rows:
        print(f"| {launcher} | {step} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
