"""Load for serve_bench.py, one closed loop per way of serving: `concurrency` requests in flight,
the next prompt sent as one finishes. Each way returns a Run: per-request timings, the wall
time from the common start to the last finish, and CPU seconds of the processes that drove it.

- engine: `Engine.add_request` / `step` in one process (the one this runs in);
- grpc:   WorkerClient streams (one thread per request in flight) from a client process;
- http:   streamed completions over aiohttp (loadgen's SSE reader) from a client process.
Client processes are spawned (`client_run`) and start together at a wall-clock instant.

Imports stay light at module level: spawned client processes import this file."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timing:
    """One request: TTFT, the gaps between its deliveries (a step's output, a gRPC message, an
    SSE chunk), output tokens and end-to-end seconds; `error` set if it failed."""

    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    e2e: float = 0.0
    error: str = ""


@dataclass
class Run:
    timings: list[Timing]
    wall_s: float
    cpu_s: dict[str, float]  # process label -> CPU seconds (user + system) during the run


def _wait_until(start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))


def engine_run(engine, prompts: list[list[int]], output_len: int, concurrency: int,
               tag: str) -> Run:
    """The closed loop on an in-process Engine (no other request may be in it)."""
    from kvmesh.workers.engine.sampling_params import SamplingParams

    sampling = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    pending = iter(enumerate(prompts))
    started: dict[str, float] = {}
    last: dict[str, float] = {}
    timings: dict[str, Timing] = {}

    def add_next() -> None:
        item = next(pending, None)
        if item is not None:
            request_id = f"{tag}-{item[0]}"
            started[request_id] = time.perf_counter()
            timings[request_id] = Timing()
            engine.add_request(request_id, item[1], sampling)

    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(concurrency):
        add_next()
    while engine.has_unfinished_requests():
        for out in engine.step():
            now, timing = time.perf_counter(), timings[out.request_id]
            if out.new_token_ids:
                if out.request_id in last:
                    timing.itls.append(now - last[out.request_id])
                else:
                    timing.ttft = now - started[out.request_id]
                last[out.request_id] = now
                timing.output_tokens += len(out.new_token_ids)
            if out.finish_reason is not None:
                timing.e2e = now - started[out.request_id]
                add_next()
    return Run(list(timings.values()), time.perf_counter() - t0,
               {"engine": time.process_time() - cpu0})


_channels: dict[tuple[str, str], Any] = {}


def _grpc_requests(target: str, token: str, prompts: list[list[int]], output_len: int,
                   concurrency: int, tag: str) -> list[Timing]:
    from kvmesh.workers.engine.sampling_params import SamplingParams
    from kvmesh.workers.service.client import WorkerClient

    sampling = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    order, lock, timings = itertools.count(), threading.Lock(), []

    def one(client: WorkerClient, index: int) -> Timing:
        timing, last, t0 = Timing(), None, time.perf_counter()
        try:
            for out in client.generate(prompts[index], sampling, request_id=f"{tag}-{index}"):
                if out.token_ids:
                    now = time.perf_counter()
                    if last is None:
                        timing.ttft = now - t0
                    else:
                        timing.itls.append(now - last)
                    last = now
                    timing.output_tokens += len(out.token_ids)
        except Exception as exc:  # noqa: BLE001 - counted as a failed request
            timing.error = repr(exc)[:200]
        timing.e2e = time.perf_counter() - t0
        return timing

    def loop(client: WorkerClient) -> None:
        while True:
            with lock:
                index = next(order)
            if index >= len(prompts):
                return
            timing = one(client, index)
            with lock:
                timings.append(timing)

    key = (target, token)
    if key not in _channels:  # one channel per client process, kept across runs
        _channels[key] = WorkerClient(target, token=token)
    threads = [threading.Thread(target=loop, args=(_channels[key],)) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings


async def _http_requests(url: str, prompts: list[list[int]], output_len: int,
                         concurrency: int) -> list[Timing]:
    import aiohttp

    from kvmesh.loadgen.serve import _stream

    order, timings = iter(range(len(prompts))), []

    async def loop(session: aiohttp.ClientSession) -> None:
        for index in order:
            body = {"prompt": prompts[index], "max_tokens": output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            result = await _stream(session, url + "/v1/completions", body, time.perf_counter())
            timings.append(Timing(result.ttft, result.itls, result.output_tokens, result.e2e,
                                  result.error))

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        await asyncio.gather(*(loop(session) for _ in range(concurrency)))
    return timings


def client_run(way: str, target: str, token: str, prompts: list[list[int]], output_len: int,
               concurrency: int, start_at: float, tag: str) -> tuple[list[Timing], float, float]:
    """One client process's share: (timings, its CPU seconds, its wall-clock end time)."""
    _wait_until(start_at)
    cpu0 = time.process_time()
    if way == "grpc":
        timings = _grpc_requests(target, token, prompts, output_len, concurrency, tag)
    else:
        timings = asyncio.run(_http_requests(target, prompts, output_len, concurrency))
    return timings, time.process_time() - cpu0, time.time()
