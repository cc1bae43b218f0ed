"""The worker's serving overhead without a GPU (issue 19): a synthetic engine with the H100
engine's host behaviour, driven (a) in-process and (b) through the real worker gRPC service.

On the H100 the in-process engine made 19.8k output tok/s and the same engine behind
`kvmesh worker` 12.5k: the engine thread is host-bound and shares the GIL with the gRPC
handlers. `SyntheticEngine.step()` reproduces that shape with no model: it holds the GIL for
`--host-ms` of pure-Python work (scheduling), releases it for `--gpu-ms` (a sleep standing for
the device window), then returns a RequestOutput carrying `--window` tokens (and text) for every
running request. The worker runs in its own process (`serve_worker(engine_factory=...)`, the real
servicer, EngineLoop and server; no store, so no write-through), the load comes from spawned
client processes with WorkerClient streams (serve_bench_load's "grpc" way). Runs interleave:
engine, then each `--servers` kind, `--repeats` times.

    python benchmarks/worker_profile.py                   # 64 streams, H=6 ms, G=6 ms, W=8
    python benchmarks/worker_profile.py --servers sync aio --py-spy /tmp/wp
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serve_bench_load import client_run, engine_run

VOCAB_SIZE = 49152
PAGE_SIZE = 16
MAX_MODEL_LEN = 8192


@dataclass(frozen=True)
class Shape:
    """What one synthetic step costs the host: `host_ms` holding the GIL, then `gpu_ms`
    released; each running request gets `window` tokens per step (its first step: one)."""

    host_ms: float = 6.0
    gpu_ms: float = 6.0
    window: int = 8
    max_num_seqs: int = 64


@dataclass
class _Request:
    request_id: str
    num_prompt: int
    max_tokens: int
    num_out: int = 0


@dataclass
class _Model:
    vocab_size: int = VOCAB_SIZE


@dataclass
class SyntheticEngine:
    """What EngineLoop, WorkerServicer and stats_to_pb call on an Engine, without a model.
    Single-threaded like the real one (owned by the engine-loop thread)."""

    shape: Shape
    model_name: str = "synthetic"
    page_size: int = PAGE_SIZE
    max_model_len: int = MAX_MODEL_LEN
    model_config: _Model = field(default_factory=_Model)
    offload: Any = None  # no store: prefill_only answers NoStore
    _waiting: list[_Request] = field(default_factory=list)
    _running: dict[str, _Request] = field(default_factory=dict)
    _num_steps: int = 0
    step_s: float = 0.0  # wall seconds inside step(), summed

    def namespace(self, tenant_salt: str = "") -> Any:
        from kvmesh.cachestore.keys import Namespace

        return Namespace(self.model_name, 16, 8, 64, "bfloat16", PAGE_SIZE, salt=tenant_salt)

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: Any,
                    tenant_salt: str = "") -> None:
        self._waiting.append(_Request(request_id, len(prompt_token_ids), sampling.max_tokens))

    def abort_request(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        self._waiting = [r for r in self._waiting if r.request_id != request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def stats(self) -> Any:
        from kvmesh.workers.engine.outputs import EngineStats

        return EngineStats(num_pages_total=4096, num_pages_free=4096 - 16 * len(self._running),
                           num_running=len(self._running), num_waiting=len(self._waiting),
                           prefix_queries=0)

    def pop_kv_events(self) -> list[Any]:
        return []

    def cached_pages(self) -> list[Any]:
        return []

    def close(self) -> None:
        pass

    def step(self) -> list[Any]:
        from kvmesh.workers.engine.outputs import RequestOutput, Usage

        t0 = time.perf_counter()
        while self._waiting and len(self._running) < self.shape.max_num_seqs:
            request = self._waiting.pop(0)
            self._running[request.request_id] = request
        _busy(self.shape.host_ms / 1e3)  # host scheduling: GIL held but for switch intervals
        time.sleep(self.shape.gpu_ms / 1e3)  # the device window, GIL released
        self._num_steps += 1
        outputs = []
        for request in list(self._running.values()):
            num_new = min(1 if request.num_out == 0 else self.shape.window,
                          request.max_tokens - request.num_out)
            ids = [(self._num_steps + i) % VOCAB_SIZE for i in range(num_new)]
            request.num_out += num_new
            is_done = request.num_out >= request.max_tokens
            outputs.append(RequestOutput(
                request.request_id, 0, ids, " tok" * num_new,
                finish_reason="length" if is_done else None,
                usage=Usage(request.num_prompt, request.num_out, 0) if is_done else None))
            if is_done:
                del self._running[request.request_id]
        self.step_s += time.perf_counter() - t0
        return outputs


def _busy(seconds: float) -> None:
    """`seconds` of this thread's CPU time in Python bytecode: time another thread holds the
    GIL meanwhile makes the step longer, as it does the real engine's host work."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for i in range(50):
            x += i


# ---- the worker process ---------------------------------------------------------------------


def worker_main(shape: Shape, grpc_server: str, conn: Any) -> None:
    """In a spawned process: serve the synthetic engine; answer "cpu" with this process's CPU
    seconds, "stop" by stopping."""
    from kvmesh.workers.config import WorkerConfig
    from kvmesh.workers.service.server import serve_worker

    config = WorkerConfig(max_num_seqs=shape.max_num_seqs, grpc_server=grpc_server)
    engine = SyntheticEngine(shape)
    handle = serve_worker(config, "127.0.0.1", 0, engine_factory=lambda: engine)
    conn.send((handle.address, os.getpid()))
    while True:
        command = conn.recv()
        if command == "stop":
            handle.stop()
            conn.send("stopped")
            return
        conn.send((time.process_time(), engine._num_steps, engine.step_s))


def engine_proc(shape: Shape, prompts: list[list[int]], output_len: int,
                concurrency: int) -> Result:
    """In a spawned process: the in-process closed loop (engine_run)."""
    engine = SyntheticEngine(shape)
    run = engine_run(engine, prompts, output_len, concurrency, "engine")
    tokens = sum(t.output_tokens for t in run.timings)
    return Result("engine", tokens / run.wall_s, run.cpu_s["engine"] / run.wall_s, 0.0, 0,
                  1e3 * run.wall_s / engine._num_steps, 1e3 * engine.step_s / engine._num_steps)


@dataclass
class Result:
    way: str
    tok_s: float
    worker_cpu: float  # cores (CPU s / wall s) of the process serving the engine
    client_cpu: float
    errors: int
    period_ms: float  # wall time per engine step, all included
    step_ms: float  # of which inside step()


def grpc_level(pool: ProcessPoolExecutor, conn: Any, address: str, prompts: list[list[int]],
               output_len: int, concurrency: int, num_procs: int, tag: str,
               pyspy: tuple[int, str] | None = None) -> Result:
    start_at = time.time() + 0.5
    futures = [pool.submit(client_run, "grpc", address, "", prompts[i::num_procs], output_len,
                           concurrency // num_procs, start_at, f"{tag}-{i}")
               for i in range(num_procs)]
    time.sleep(max(0.0, start_at - time.time()))
    conn.send("cpu")
    (cpu0, steps0, step_s0), t0 = conn.recv(), time.time()
    spy = None
    if pyspy is not None:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(pyspy[0]), "--duration", "3",
                                "--rate", "200", "--format", "raw", "--threads", "--gil",
                                "--output", pyspy[1], "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = [f.result() for f in futures]
    end = max(r[2] for r in results)
    conn.send("cpu")
    cpu1, steps1, step_s1 = conn.recv()
    wall = end - t0
    if spy is not None:
        spy.wait()
    timings = [t for r in results for t in r[0]]
    return Result(tag, sum(t.output_tokens for t in timings) / wall, (cpu1 - cpu0) / wall,
                  sum(r[1] for r in results) / wall, sum(1 for t in timings if t.error),
                  1e3 * wall / max(1, steps1 - steps0),
                  1e3 * (step_s1 - step_s0) / max(1, steps1 - steps0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-ms", type=float, default=6.0)
    ap.add_argument("--gpu-ms", type=float, default=6.0)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=320)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--servers", nargs="+", default=["sync"], choices=["sync", "aio"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--py-spy", default=None, help="folder: one raw py-spy profile per server "
                    "kind (3 s, GIL-holding samples, first repeat)")
    args = ap.parse_args()
    shape = Shape(args.host_ms, args.gpu_ms, args.window, args.streams)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB_SIZE) for _ in range(args.prompt_len)]
               for _ in range(args.num_requests)]
    spawn = multiprocessing.get_context("spawn")
    workers: dict[str, tuple[Any, Any, str, int]] = {}
    for kind in args.servers:
        parent, child = spawn.Pipe()
        proc = spawn.Process(target=worker_main, args=(shape, kind, child), daemon=True)
        proc.start()
        address, pid = parent.recv()
        workers[kind] = (proc, parent, address, pid)
    if args.py_spy:
        os.makedirs(args.py_spy, exist_ok=True)
    results: list[Result] = []
    print(f"shape {shape}, {args.streams} streams x {args.output_len} tokens, "
          f"{args.num_requests} requests, {os.cpu_count()} cores", flush=True)
    with ProcessPoolExecutor(1, mp_context=spawn) as one, \
            ProcessPoolExecutor(args.client_procs, mp_context=spawn) as pool:
        for kind, (_, conn, address, _) in workers.items():  # warm-up: spawn, imports, channels
            grpc_level(pool, conn, address, prompts[:16], 16, 2 * args.client_procs,
                       args.client_procs, f"warm-{kind}")
        one.submit(engine_proc, shape, prompts[:8], 16, 8).result()
        for repeat in range(args.repeats):
            results.append(one.submit(engine_proc, shape, prompts, args.output_len,
                                      args.streams).result())
            print(f"  {results[-1]}", flush=True)
            for kind, (_, conn, address, pid) in workers.items():
                spy = ((pid, os.path.join(args.py_spy, f"{kind}.txt"))
                       if args.py_spy and repeat == 0 else None)
                results.append(grpc_level(pool, conn, address, prompts, args.output_len,
                                          args.streams, args.client_procs, kind, spy))
                print(f"  {results[-1]}", flush=True)
    for proc, conn, _, _ in workers.values():
        conn.send("stop")
        conn.recv()
        proc.join(10)
    engine_tok_s = statistics.median(r.tok_s for r in results if r.way == "engine")
    print("\n| way | tok/s (median; runs) | vs engine | worker CPU (cores) | client CPU | "
          "ms per step (in step()) | errors |")
    print("|---|---|---|---|---|---|---|")
    for way in ["engine", *args.servers]:
        mine = [r for r in results if r.way == way]
        tok_s = statistics.median(r.tok_s for r in mine)
        print(f"| {way} | {tok_s:,.0f} ({', '.join(f'{r.tok_s:,.0f}' for r in mine)}) | "
              f"{tok_s / engine_tok_s:.2f} | {statistics.median(r.worker_cpu for r in mine):.2f}"
              f" | {statistics.median(r.client_cpu for r in mine):.2f} | "
              f"{statistics.median(r.period_ms for r in mine):.1f} "
              f"({statistics.median(r.step_ms for r in mine):.1f}) | "
              f"{sum(r.errors for r in mine)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
