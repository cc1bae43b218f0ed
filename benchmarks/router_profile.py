"""Router CPU per streamed token, without a GPU (issue 19).

A real router (`router.cli.start_router`, in its own process) in front of a synthetic worker
that speaks the Worker gRPC API (Stats, KvEvents, Generate) and streams `--tokens-per-message`
tokens per GenerateResponse every `--interval-ms` per stream: the router is the only thing
measured. HTTP load (streamed completions, closed loop) comes from `--client-procs` processes
(serve_bench_load). Reports router CPU-seconds per 1k tokens and per SSE chunk, tok/s, and
optionally a profile of the router process (`--profile py-spy` samples it: flat top lines by
self time; `--profile cprofile` runs cProfile inside it: slower, but exact call counts).

`--ttft-requests N` instead measures what the router adds to time to first token: N requests
one at a time (the synthetic worker answers at once), alternating in blocks between HTTP through
the router and direct worker gRPC (WorkerClient), each way's TTFT p50 / p90 and the difference.

    python benchmarks/router_profile.py --streams 64 --output-len 256 --tokens-per-message 6
    python benchmarks/router_profile.py --ttft-requests 400 --prompt-len 500
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import psutil
from serve_bench_load import client_run

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # inherited by the spawned processes


# ---- the synthetic worker -------------------------------------------------------------------
def worker_main(conn, tokens_per_message: int, interval_s: float, kv_events: bool) -> None:
    import grpc

    from kvmesh.cachestore.keys import Namespace
    from kvmesh.cachestore.rpc.wire import namespace_to_spec
    from kvmesh.v1 import worker_pb2, worker_pb2_grpc

    namespace = namespace_to_spec(Namespace("synthetic", 16, 8, 64, "bfloat16"))
    events: asyncio.Queue = asyncio.Queue()  # with --kv-events: a PagesStored per output page

    class SyntheticWorker(worker_pb2_grpc.WorkerServicer):
        async def Generate(self, request, context):
            total = request.sampling.max_tokens or 256
            sent = 0
            while sent < total:
                num = min(tokens_per_message, total - sent)
                if kv_events and sent // 16 != (sent + num) // 16:
                    key = os.urandom(16)
                    events.put_nowait(worker_pb2.PagesStored(keys=[key], tier=1))
                sent += num
                message = worker_pb2.GenerateResponse(
                    request_id=request.request_id, token_ids=range(1000, 1000 + num),
                    text=" tok" * num)
                if sent == total:
                    message.finish_reason = worker_pb2.FINISH_REASON_LENGTH
                    message.usage.prompt_tokens = len(request.prompt_token_ids)
                    message.usage.completion_tokens = total
                yield message
                if interval_s and sent < total:
                    await step  # every stream's next message comes at the same step

        async def Stats(self, request, context):
            return worker_pb2.WorkerStats(model="synthetic", page_size=16, num_pages_total=1000,
                                          num_pages_free=1000, max_model_len=1 << 16,
                                          namespace=namespace, kv_events_seq=1, role="both")

        async def KvEvents(self, request, context):
            yield worker_pb2.KvEvent(seq=1, cleared=worker_pb2.AllCleared(epoch=1))
            seq = 1
            while True:  # cancelled when the router goes
                stored = await events.get()
                seq += 1
                yield worker_pb2.KvEvent(seq=seq, stored=stored)

    step: asyncio.Future

    async def steps() -> None:
        """An engine's steps: each ends with a message to every stream (`interval_s` apart)."""
        nonlocal step
        while True:
            step = asyncio.get_running_loop().create_future()
            await asyncio.sleep(interval_s)
            step.set_result(None)

    async def serve() -> None:
        ticker = asyncio.create_task(steps()) if interval_s else None  # noqa: F841 - kept
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(SyntheticWorker(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await server.stop(None)

    asyncio.run(serve())


# ---- the router -----------------------------------------------------------------------------
def router_main(conn, worker: str, cprofile_path: str) -> None:
    from kvmesh.router.cli import start_router, stop_router
    from kvmesh.router.config import RouterConfig

    async def serve() -> None:
        config = RouterConfig(workers=(worker,), port=0, health_interval_s=1.0)
        runner, router, (_, port) = await start_router(config, ready_timeout=30)
        conn.send(port)
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, conn.recv)) != "stop":
            if cprofile_path and command == "profile":
                import cProfile
                profiler = cProfile.Profile()
                profiler.enable()
            elif cprofile_path and command == "dump":
                profiler.disable()
                profiler.dump_stats(cprofile_path)
            conn.send("ok")
        await stop_router(runner, router)

    asyncio.run(serve())


def _start(ctx, target, *args):
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    return process, parent, parent.recv()


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _main_thread_cpu_s(process: psutil.Process) -> float:
    """CPU of the process's first thread: the router's event loop (the rest is mostly gRPC's)."""
    thread = min(process.threads(), key=lambda t: t.id)
    return thread.user_time + thread.system_time


def print_py_spy_top(raw_path: str, num: int = 25) -> None:
    """Flat profile from py-spy's collapsed stacks (samples holding the GIL, by function):
    self and inclusive share of samples."""
    own, total, num_samples = collections.Counter(), collections.Counter(), 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames, n = stack.split(";"), int(count)
            num_samples += n
            own[frames[-1]] += n
            for frame in set(frames):
                total[frame] += n
    print(f"py-spy: {num_samples} samples; self%  incl%  function (file:line)")
    for frame, n in own.most_common(num):
        print(f"  {100 * n / num_samples:5.1f} {100 * total[frame] / num_samples:5.1f}  {frame}")


def measure_ttft(ctx, url: str, worker: str, prompts: list[list[int]], num: int,
                 block: int = 20) -> None:
    """TTFT one request at a time, blocks of `block` alternating between the ways, in one client
    process (warmed up on both first)."""
    import numpy as np

    ways = {"http": url, "grpc": worker}
    got: dict[str, list[float]] = {way: [] for way in ways}
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        for way, target in ways.items():  # warm-up: connections, first-call costs
            pool.submit(client_run, way, target, "", prompts[:4], 2, 1, time.time(), "w").result()
        for start in range(0, num, block):
            for way, target in ways.items():
                chunk = [prompts[(start + i) % len(prompts)] for i in range(block)]
                timings, _, _ = pool.submit(client_run, way, target, "", chunk, 2, 1,
                                            time.time(), f"t{start}").result()
                got[way] += [t.ttft for t in timings if not t.error]
    p = {way: np.percentile(np.array(values) * 1e3, [50, 90]) for way, values in got.items()}
    for way, (p50, p90) in p.items():
        print(f"{way:5} {len(got[way])} requests  TTFT p50 {p50:.2f} ms  p90 {p90:.2f} ms")
    print(f"router adds {p['http'][0] - p['grpc'][0]:.2f} ms at p50, "
          f"{p['http'][1] - p['grpc'][1]:.2f} ms at p90")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64, help="requests in flight")
    parser.add_argument("--num-requests", type=int, default=0, help="default: 4 x streams")
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--tokens-per-message", type=int, default=6)
    parser.add_argument("--interval-ms", type=float, default=0.0,
                        help="between the synthetic engine's steps, each a message to every "
                             "stream (0: each stream as fast as it can)")
    parser.add_argument("--kv-events", action="store_true",
                        help="the worker reports a stored page per 16 output tokens (KvEvents)")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--profile", choices=("none", "py-spy", "cprofile"), default="none")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ttft-requests", type=int, default=0,
                        help="measure the router's added TTFT with this many requests a way")
    args = parser.parse_args()
    num_requests = args.num_requests or 4 * args.streams
    ctx = multiprocessing.get_context("spawn")
    worker, worker_conn, worker_port = _start(ctx, worker_main, args.tokens_per_message,
                                              args.interval_ms / 1000, args.kv_events)
    cprofile_path = (tempfile.mkstemp(suffix=".prof")[1] if args.profile == "cprofile" else "")
    router, router_conn, port = _start(ctx, router_main, f"127.0.0.1:{worker_port}",
                                       cprofile_path)
    url = f"http://127.0.0.1:{port}"
    prompts = [[100 + (i * 7 + j) % 5000 for j in range(args.prompt_len)]
               for i in range(num_requests)]
    procs = {"router": psutil.Process(router.pid), "worker": psutil.Process(worker.pid)}
    if args.ttft_requests:
        try:
            measure_ttft(ctx, url, f"127.0.0.1:{worker_port}", prompts, args.ttft_requests)
        finally:
            router_conn.send("stop")
            router.join(30)
            worker_conn.send("stop")
            worker.join(30)
        return
    with ProcessPoolExecutor(args.client_procs, mp_context=ctx) as pool:
        # warm-up (connections, first-call costs), then the measured run
        warm = [pool.submit(client_run, "http", url, "", prompts[:4], 16, 2, time.time(), "w")
                for _ in range(args.client_procs)]
        [f.result() for f in warm]
        if args.profile == "cprofile":
            router_conn.send("profile")
            router_conn.recv()
        spy = None
        if args.profile == "py-spy":
            raw_path = tempfile.mkstemp(suffix=".txt")[1]
            spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"),
                                    "record", "--pid", str(router.pid), "--format", "raw",
                                    "--function", "--gil", "--rate", "200", "-o", raw_path],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # attached
        n = args.client_procs
        start_at = time.time() + 1.0
        cpu0 = {name: _cpu_s(p) for name, p in procs.items()}
        main0 = _main_thread_cpu_s(procs["router"])
        futures = [pool.submit(client_run, "http", url, "", prompts[i::n], args.output_len,
                               args.streams // n + (i < args.streams % n), start_at, "m")
                   for i in range(n)]
        results = [f.result() for f in futures]
        cpu = {name: _cpu_s(p) - cpu0[name] for name, p in procs.items()}
        main_cpu = _main_thread_cpu_s(procs["router"]) - main0
    wall = max(end for _, _, end in results) - start_at
    timings = [t for r in results for t in r[0]]
    errors = [t.error for t in timings if t.error]
    tokens = sum(t.output_tokens for t in timings)
    chunks = sum(len(t.itls) + 1 for t in timings if not t.error)
    clients_cpu = sum(c for _, c, _ in results)
    print(f"{len(timings)} requests ({len(errors)} failed{': ' + errors[0] if errors else ''}), "
          f"{args.streams} streams, {args.output_len} tokens each, {args.tokens_per_message} "
          f"tokens/message, interval {args.interval_ms:g} ms, kv events {args.kv_events}, "
          f"profile {args.profile}")
    print(f"wall {wall:.2f} s  {tokens / wall:,.0f} tok/s  {chunks / wall:,.0f} chunks/s  "
          f"{tokens / max(chunks, 1):.2f} tok/chunk")
    print(f"router CPU {cpu['router']:.2f} s ({100 * cpu['router'] / wall:.0f}% of a core): "
          f"{1000 * cpu['router'] / tokens * 1000:.1f} ms per 1k tokens, "
          f"{1e6 * cpu['router'] / max(chunks, 1):.0f} us per chunk "
          f"({1e6 * main_cpu / max(chunks, 1):.0f} on the event loop's thread)  |  worker CPU "
          f"{cpu['worker']:.2f} s, clients CPU {clients_cpu:.2f} s")
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes its file
        _, err = spy.communicate(timeout=60)
        if os.path.getsize(raw_path):
            print_py_spy_top(raw_path, args.top)
        else:
            print("py-spy wrote nothing:", err.decode()[-500:])
    if args.profile == "cprofile":
        import pstats
        router_conn.send("dump")
        router_conn.recv()
        pstats.Stats(cprofile_path).sort_stats("tottime").print_stats(args.top)
    router_conn.send("stop")
    router.join(30)
    worker_conn.send("stop")
    worker.join(30)


if __name__ == "__main__":
    main()
