"""`kvmesh ray deploy|status|down` on a real 2-node Ray cluster (1 CPU each) started by the test
on this machine, with the real store, two real SmolLM2 CPU workers and the real router; one
variant puts the store's shared tier on a real redis-server and disaggregates the workers (a
prefill and a decode worker, handing pages over through the store and Redis)."""

from __future__ import annotations

import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import ray
import redis
from ray_testing import (
    API_KEY,
    PAGE_SIZE,
    PROMPT_IDS,
    WORKER_ARGS,
    RayHead,
    all_healthy,
    complete,
    free_ports,
    health,
    kvmesh,
    metric,
    ray_start,
    ray_stop,
    routed_to,
    wait_for,
)

from kvmesh.cachestore.codec import decode_header
from kvmesh.cachestore.page_mac import TRAILER_NBYTES

pytestmark = pytest.mark.timeout(420)
COLOCATED = ("--workers", "2")
DISAGGREGATED = ("--prefill-workers", "1", "--decode-workers", "1")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A 2-node Ray cluster on this machine (head and one more node, 1 CPU each: 2 CPUs in all),
    on free ports, so SPREAD really spreads: each worker gets a node of its own."""
    gcs, client, dashboard = free_ports(3)
    logs = tmp_path_factory.mktemp("ray")
    address = f"127.0.0.1:{gcs}"
    processes = [ray_start(["--head", "--num-cpus", "1", "--port", str(gcs),
                           "--include-dashboard=false", "--dashboard-port", str(dashboard),
                           "--ray-client-server-port", str(client)], logs / "head.log")]
    try:
        processes.append(ray_start(["--address", address, "--num-cpus", "1"], logs / "node.log"))
        ray.init(address=address, namespace="kvmesh", log_to_driver=False)
        wait_for("2 Ray nodes", lambda: sum(n["Alive"] for n in ray.nodes()) == 2, 60)
        yield RayHead(address, processes[0])
    finally:
        ray.shutdown()
        for process in reversed(processes):
            ray_stop(process)


class Stack:
    """A deployed stack: ports, router URL and the pids `kvmesh ray status` reported."""

    def __init__(self, head: RayHead, *extra: str, workers: tuple[str, ...] = COLOCATED) -> None:
        self.store_port, self.router_port, self.worker_port = free_ports(3)
        self.head = head
        out = kvmesh("ray", "deploy", "--address", head.address, *workers,
                     "--num-cpus-per-worker", "1", "--port", str(self.router_port),
                     "--store-port", str(self.store_port), "--worker-port",
                     str(self.worker_port), "--max-restarts", "2", "--timeout", "300",
                     "--host-tier-bytes", str(8 << 20), "--worker-args", WORKER_ARGS, *extra)
        assert out.returncode == 0, out.stdout + out.stderr
        try:
            last = out.stdout.splitlines()[-1]
            assert re.fullmatch(rf"kvmesh serving on http://[\d.]+:{self.router_port}", last), last
            self.url = last.split()[-1]
            # `name role address node IP pid PID` per actor, as `kvmesh ray status` prints
            rows = {row[0]: row for row in map(str.split, out.stdout.splitlines()[:-1])}
            names = (["kvmesh-worker-0", "kvmesh-worker-1"] if workers == COLOCATED
                     else ["kvmesh-prefill-worker-0", "kvmesh-decode-worker-0"])
            assert sorted(rows) == sorted(["kvmesh-router", "kvmesh-store", *names])
            self.workers = [rows[name][2] for name in names]
            assert [w.rsplit(":", 1)[1] for w in self.workers] == [
                str(self.worker_port), str(self.worker_port + 1)]
            self.pids = {name: int(row[6]) for name, row in rows.items()}
            wait_for("both workers healthy", lambda: all(health(self.url).values()))
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        out = kvmesh("ray", "down", "--address", self.head.address, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[:4] == ["kvmesh", "ray", "down:", "stopped"]


def _assert_nothing_left(stack: Stack, more_pids: list[int]) -> None:
    assert [n for n in ray.util.list_named_actors() if n.startswith("kvmesh-")] == []
    for pid in [*stack.pids.values(), *more_pids]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    out = kvmesh("ray", "status", "--address", stack.head.address, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (1, "kvmesh is not deployed in namespace "
                                                       "'kvmesh'")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{stack.url}/health", timeout=5)


def _processes_with(arg: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if arg in " ".join(p.info["cmdline"] or [])]


def test_role_that_cannot_start_fails_the_deploy_and_leaves_nothing(ray_head):
    store_port, router_port, worker_port = free_ports(3)
    out = kvmesh("ray", "deploy", "--address", ray_head.address, "--workers", "2",
                 "--port", str(router_port), "--store-port", str(store_port),
                 "--worker-port", str(worker_port), "--worker-args", "--max-num-seqs 0",
                 timeout=180)
    assert out.returncode == 1
    assert ("kvmesh ray deploy: the stack failed to start: kvmesh worker exited with 2 before "
            "listening; last output:\nkvmesh worker: max_num_seqs must be positive, got 0"
            ) in out.stderr
    assert [n for n in ray.util.list_named_actors() if n.startswith("kvmesh-")] == []
    with pytest.raises(ValueError):
        ray.util.get_placement_group("kvmesh-workers")
    wait_for("the store and router processes gone", lambda: not any(
        _processes_with(f"--port {port}") for port in (store_port, router_port)), 30)


def test_deploy_serve_survive_worker_kill_and_down(ray_head):
    stack = Stack(ray_head)
    restarted_pids: list[int] = []
    try:
        status = kvmesh("ray", "status", "--address", ray_head.address, timeout=60)
        assert status.returncode == 0, status.stderr
        names = [line.split()[0] for line in status.stdout.splitlines()[:-1]]
        assert names == ["kvmesh-router", "kvmesh-store", "kvmesh-worker-0", "kvmesh-worker-1"]
        again = kvmesh("ray", "deploy", "--address", ray_head.address, timeout=60)
        assert (again.returncode, again.stderr.strip()) == (1, "kvmesh ray deploy: kvmesh is "
                                                            "already deployed in namespace "
                                                            "'kvmesh'; run `kvmesh ray down` first")
        first = complete(stack.url, PROMPT_IDS)
        expected_text = first["choices"][0]["text"]
        assert first["usage"] == first["usage"] | {"prompt_tokens": len(PROMPT_IDS),
                                                   "completion_tokens": 6}
        # the worker that served it reports its pages; find it in the index
        wait_for("pages in the index", lambda: any(
            (metric(stack.url, "kvmesh:index_worker_pages", w) or 0) >= 6
            for w in stack.workers))
        victim_index = next(i for i, w in enumerate(stack.workers)
                            if metric(stack.url, "kvmesh:index_worker_pages", w) >= 6)
        victim = stack.workers[victim_index]
        worker_actors = [ray.get_actor(f"kvmesh-worker-{i}") for i in range(2)]
        infos = ray.get([a.info.remote() for a in worker_actors], timeout=30)
        assert infos[0]["node_id"] != infos[1]["node_id"]  # SPREAD: one worker per node
        actor, old = worker_actors[victim_index], infos[victim_index]

        ray.kill(actor, no_restart=False)
        wait_for("the old worker process gone", lambda: not psutil.pid_exists(
            old["child_pid"]) or psutil.Process(old["child_pid"]).status() == "zombie", 30)
        # while Ray restarts it (the model takes a while to load), requests keep succeeding
        again = complete(stack.url, PROMPT_IDS)
        assert again["choices"][0]["text"] == expected_text
        wait_for("the router drops the dead worker", lambda: health(stack.url)[victim] is False
                 and metric(stack.url, "kvmesh:worker_healthy", victim) == 0.0, 30)
        assert metric(stack.url, "kvmesh:index_worker_pages", victim) == 0.0
        assert complete(stack.url, "The capital of France is")["usage"]["completion_tokens"] == 6

        new = ray.get(actor.info.remote(), timeout=300)  # returns once the restart is listening
        assert new["node_id"] == old["node_id"]  # its placement-group bundle kept its node
        restarted_pids.append(new["child_pid"])
        assert (new["address"], new["is_restarted"]) == (victim, True)
        assert new["child_pid"] != old["child_pid"] and new["actor_pid"] != old["actor_pid"]
        wait_for("the router takes the restarted worker back", lambda: health(stack.url)[victim])
        # the restarted worker serves again: fresh prompts, two at a time, until the router
        # (which sends PROMPT_IDS to the worker that caches it) has picked it for one
        decided = routed_to(stack.url, victim)
        with ThreadPoolExecutor(2) as pool:
            for round_ in range(10):
                prompts = [[t + 1000 * (round_ + 1) + 17 * j for t in PROMPT_IDS] for j in range(2)]
                answers = list(pool.map(lambda p: complete(stack.url, p), prompts))
                assert [a["usage"]["completion_tokens"] for a in answers] == [6, 6]
                if routed_to(stack.url, victim) > decided:
                    break
        assert routed_to(stack.url, victim) > decided
        wait_for("the restarted worker's pages in the index",
                 lambda: (metric(stack.url, "kvmesh:index_worker_pages", victim) or 0) >= 6, 30)
        # a role that dies on its own takes its actor down; Ray restarts it at the same address
        store = ray.get_actor("kvmesh-store")
        os.kill(stack.pids["kvmesh-store"], signal.SIGKILL)
        wait_for("the store restarted", lambda: ray.get(store.info.remote(), timeout=120)[
            "child_pid"] != stack.pids["kvmesh-store"], 120)
        restarted_pids.append(ray.get(store.info.remote())["child_pid"])
        assert ray.get(store.info.remote())["is_restarted"] is True
        assert complete(stack.url, PROMPT_IDS)["choices"][0]["text"] == expected_text
        # the router too comes back on its port
        router = ray.get_actor("kvmesh-router")
        ray.kill(router, no_restart=False)
        wait_for("the router restarted", lambda: ray.get(router.info.remote(), timeout=300)[
            "child_pid"] != stack.pids["kvmesh-router"], 300)
        restarted_pids.append(ray.get(router.info.remote())["child_pid"])
        wait_for("the restarted router sees both workers", lambda: all_healthy(stack.url))
        assert complete(stack.url, PROMPT_IDS)["choices"][0]["text"] == expected_text
        status = kvmesh("ray", "status", "--address", ray_head.address, timeout=60)
        assert f"kvmesh-worker-{victim_index}" in status.stdout
        assert "(restarted)" in status.stdout
    finally:
        stack.down()
    _assert_nothing_left(stack, restarted_pids)


def test_deploy_with_redis_shared_tier(ray_head, redis_server):
    # a store CPU tier smaller than one page (30 layers x 2 x 16 x 3 x 64 fp32 = 720 KiB):
    # every page the workers write through lands in Redis
    # with auth on every hop: the pages reach Redis only if the workers' store token works.
    # The prompt is prefilled on the prefill worker: the decode worker takes its pages from
    # the store, which holds them in Redis.
    stack = Stack(ray_head, "--redis-url", redis_server.url, "--store-cpu-bytes", "65536",
                  "--token", "hop-token", "--api-key", API_KEY,
                  "--router-args", f"--pd-min-tokens {4 * PAGE_SIZE}", workers=DISAGGREGATED)
    try:
        refused = httpx.post(f"{stack.url}/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        first = complete(stack.url, PROMPT_IDS, api_key=API_KEY)
        assert first["usage"]["completion_tokens"] == 6
        handed_over = first["usage"]["prompt_tokens_details"]["cached_tokens_by_tier"]
        assert handed_over.get("store", 0) >= len(PROMPT_IDS) - PAGE_SIZE, first["usage"]
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        wait_for("pages in redis", lambda: client.dbsize() >= 6, 60)
        pages = {}
        for redis_key in client.scan_iter(match=b"kvmesh:*"):
            # Redis is shared: ray deploy seals its pages with a MAC trailer
            header = decode_header(client.get(redis_key)[:-TRAILER_NBYTES])
            assert redis_key == b"kvmesh:" + header.key
            pages[header.token_ids.tolist()[0]] = header.token_ids.tolist()
        # the prompt's 6 full pages (generated tokens may fill no further page)
        expected = {PROMPT_IDS[i]: PROMPT_IDS[i:i + PAGE_SIZE]
                    for i in range(0, 6 * PAGE_SIZE, PAGE_SIZE)}
        assert {k: v for k, v in pages.items() if k in expected} == expected
        client.close()
        # the shared tier going down costs cache hits (and the handoff), not requests
        redis_server.kill()
        answer = complete(stack.url, PROMPT_IDS[::-1], api_key=API_KEY)
        assert answer["usage"]["completion_tokens"] == 6
    finally:
        stack.down()
    _assert_nothing_left(stack, [])
