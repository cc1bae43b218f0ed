"""Cost of the Worker gRPC service: the same requests driven in-process on an Engine (the peer)
and through `WorkerClient` -> gRPC over loopback -> engine-loop thread, in one run.

Both paths use Engines built on the same loaded weights and config; every run uses fresh random
prompts (no prefix-cache hits), greedy decoding with ignore_eos, and the paths alternate per
repeat so machine load hits both alike. Prints a table of median decode throughput and mean
time to first token.

    python3 benchmarks/worker_service_bench.py --concurrency 1 4 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.engine import Engine
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.models.loader import load_model
from kvmesh.workers.service.client import WorkerClient
from kvmesh.workers.service.server import serve_worker


def _prompts(rng: random.Random, num: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def run_in_process(engine: Engine, prompts: list[list[int]], sampling: SamplingParams):
    """(generated tokens, seconds, mean TTFT seconds) driving engine.step() directly."""
    start = time.perf_counter()
    first: dict[str, float] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{start}-{i}", prompt, sampling)
    num_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            num_tokens += len(out.new_token_ids)
            first.setdefault(out.request_id, time.perf_counter() - start)
    return num_tokens, time.perf_counter() - start, statistics.mean(first.values())


def run_grpc(address: str, prompts: list[list[int]], sampling: SamplingParams):
    """The same through the gRPC service, one client thread per request."""
    counts = [0] * len(prompts)
    ttft = [0.0] * len(prompts)
    start = time.perf_counter()

    def one(i: int) -> None:
        with WorkerClient(address) as client:
            for out in client.generate(prompts[i], sampling, timeout=600):
                if counts[i] == 0:
                    ttft[i] = time.perf_counter() - start
                counts[i] += len(out.token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - start, statistics.mean(ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model)
    config = WorkerConfig(model=args.model, device=args.device, max_model_len=1024,
                          kv_cache_bytes=256 << 20)
    engine = Engine(config, loaded=loaded)
    handle = serve_worker(config, engine_factory=lambda: Engine(config, loaded=loaded))
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    vocab = loaded.config.vocab_size
    rng = random.Random(0)
    # warm-up: both paths once
    run_in_process(engine, _prompts(rng, 1, args.prompt_tokens, vocab), sampling)
    run_grpc(handle.address, _prompts(rng, 1, args.prompt_tokens, vocab), sampling)

    rows = []
    for concurrency in args.concurrency:
        results: dict[str, list[tuple[int, float, float]]] = {"in-process": [], "grpc": []}
        for _ in range(args.repeats):
            prompts = _prompts(rng, concurrency, args.prompt_tokens, vocab)
            results["in-process"].append(run_in_process(engine, prompts, sampling))
            prompts = _prompts(rng, concurrency, args.prompt_tokens, vocab)
            results["grpc"].append(run_grpc(handle.address, prompts, sampling))
        peer = statistics.median(n / s for n, s, _ in results["in-process"])
        for path, runs in results.items():
            tps = statistics.median(n / s for n, s, _ in runs)
            ttft_ms = 1000 * statistics.mean(t for _, _, t in runs)
            rows.append((path, concurrency, tps, ttft_ms, tps / peer))
    handle.stop()
    engine.close()

    print(f"{args.model} on {args.device}, prompt {args.prompt_tokens} tokens, "
          f"{args.max_tokens} new tokens, median of {args.repeats}")
    print("| path | concurrency | tokens/s | mean TTFT ms | vs in-process |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path, concurrency, tps, ttft_ms, ratio in rows:
        print(f"| {path} | {concurrency} | {tps:.1f} | {ttft_ms:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
