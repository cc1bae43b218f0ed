"""`kvmesh bench serve`: load a running OpenAI-compatible server (like `vllm bench serve`).

Workloads: `shared-prefix` (groups of prompts sharing a long system prefix, /v1/completions) and
`multi-turn` (conversations whose every turn resends the history, /v1/chat/completions).
Arrivals: Poisson at `--request-rate` or back-to-back under `--max-concurrency`. Streams every
request (SSE) and reports TTFT / ITL / E2E percentiles, throughput and the prefix-cache hit rate
from `usage.prompt_tokens_details.cached_tokens`; writes a PNG plot and optionally JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

WORDS = ("river stone lamp orbit velvet maple signal harbor copper meadow lantern quartz "
         "falcon ember glacier cedar prism tundra beacon willow").split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0
    error: str = ""
    text: str = ""


def _text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


async def _stream(session: aiohttp.ClientSession, url: str, body: dict, t0: float) -> Result:
    """One streamed request; output chunks timed as they arrive."""
    result = Result(ok=False, start=t0)
    last = None
    text = []
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "error")
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.output_tokens = usage["completion_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens", 0)
                for choice in event.get("choices", []):
                    delta = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if not delta:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - t0
                    else:
                        result.itls.append(now - last)
                    last = now
                    text.append(delta)
        result.e2e = time.perf_counter() - t0
        result.ok = last is not None
        result.error = "" if result.ok else "no output"
        result.text = "".join(text)
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = repr(exc)
    return result


def shared_prefix_jobs(args: argparse.Namespace, rng: random.Random) -> list[list[dict]]:
    """One job per request: a group's prefix (~prefix_words words) + a unique question."""
    prefixes = [f"System {g}: " + _text(rng, args.prefix_words) for g in range(args.num_groups)]
    jobs = []
    for i in range(args.num_prompts):
        prompt = prefixes[i % args.num_groups] + f"\nQuestion {i}: " + _text(rng, 12) + "?"
        jobs.append([{"prompt": prompt}])
    return jobs


def multi_turn_jobs(args: argparse.Namespace, rng: random.Random) -> list[list[dict]]:
    """One job per conversation: `turns` user messages, sent in order, each with the history."""
    num_convs = max(args.num_prompts // args.turns, 1)
    return [[{"user": f"Turn {t}: " + _text(rng, args.prefix_words // 4)}
             for t in range(args.turns)] for _ in range(num_convs)]


async def run_job(session, args, job: list[dict], results: list[Result], progress) -> None:
    messages: list[dict] = []
    for step in job:
        common = {"model": args.model, "max_tokens": args.output_len, "temperature": 0,
                  "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if "prompt" in step:
            url, body = args.url + "/v1/completions", {**common, "prompt": step["prompt"]}
        else:
            messages.append({"role": "user", "content": step["user"]})
            url, body = args.url + "/v1/chat/completions", {**common, "messages": list(messages)}
        result = await _stream(session, url, body, time.perf_counter())
        results.append(result)
        progress.update(1)
        if "user" in step:
            messages.append({"role": "assistant", "content": result.text})


async def run(args: argparse.Namespace) -> tuple[list[Result], float]:
    from tqdm import tqdm

    rng = random.Random(args.seed)
    jobs = (shared_prefix_jobs if args.workload == "shared-prefix" else multi_turn_jobs)(args, rng)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if not args.model:
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(args.url + "/v1/models") as response:
                args.model = (await response.json())["data"][0]["id"]
    results: list[Result] = []
    limit = asyncio.Semaphore(args.max_concurrency or len(jobs))
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    progress = tqdm(total=sum(len(j) for j in jobs), desc="requests", file=sys.stderr)

    async def guarded(job):
        async with limit:
            await run_job(session, args, job, results, progress)

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        tasks = []
        for job in jobs:
            tasks.append(asyncio.create_task(guarded(job)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
    progress.close()
    return results, time.perf_counter() - t0


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft for r in ok]) * 1e3
    itl = np.array([x for r in ok for x in r.itls]) * 1e3
    e2e = np.array([r.e2e for r in ok]) * 1e3
    prompt = sum(r.prompt_tokens for r in ok)

    def pct(a: np.ndarray) -> dict:
        if not len(a):
            return {}
        return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}

    return {"requests": len(results), "failed": len(results) - len(ok), "duration_s": duration,
            "request_throughput": len(ok) / duration,
            "output_throughput": sum(r.output_tokens for r in ok) / duration,
            "prompt_tokens": prompt, "cached_tokens": sum(r.cached_tokens for r in ok),
            "cache_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
            "ttft_ms": pct(ttft), "itl_ms": pct(itl), "e2e_ms": pct(e2e),
            "errors": sorted({r.error for r in results if not r.ok})[:5]}


def print_table(args: argparse.Namespace, s: dict) -> None:
    print(f"============ kvmesh bench serve: {args.workload} ============")
    print(f"{'Successful requests:':<34}{s['requests'] - s['failed']:>10}")
    print(f"{'Failed requests:':<34}{s['failed']:>10}")
    print(f"{'Benchmark duration (s):':<34}{s['duration_s']:>10.2f}")
    print(f"{'Request throughput (req/s):':<34}{s['request_throughput']:>10.2f}")
    print(f"{'Output token throughput (tok/s):':<34}{s['output_throughput']:>10.2f}")
    print(f"{'Prefix cache hit rate:':<34}{s['cache_hit_rate']:>10.1%}")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        for key, value in s[name].items():
            print(f"{(key.upper() + ' ' + name.replace('_ms', '').upper() + ' (ms):'):<34}"
                  f"{value:>10.2f}")
    for error in s["errors"]:
        print("error:", error)


def plot(results: list[Result], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in results if r.ok), key=lambda r: r.start)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    start = ok[0].start if ok else 0.0
    hit = [r.cached_tokens / r.prompt_tokens if r.prompt_tokens else 0 for r in ok]
    points = ax1.scatter([r.start - start for r in ok], [r.ttft * 1e3 for r in ok], c=hit,
                         cmap="viridis", vmin=0, vmax=1, s=12)
    fig.colorbar(points, ax=ax1, label="cached fraction of prompt")
    ax1.set(xlabel="request start (s)", ylabel="TTFT (ms)", title="TTFT per request")
    for label, values in (("TTFT", [r.ttft for r in ok]), ("ITL", [x for r in ok for x in r.itls])):
        if values:
            v = np.sort(np.array(values) * 1e3)
            ax2.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
    ax2.set(xscale="log", xlabel="ms", ylabel="CDF", title="latency CDF")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def peer_run(args: argparse.Namespace) -> dict[str, list[Result]]:
    """The peer, same stack, same minute: fresh prompts one at a time, alternately straight to
    a worker over gRPC and through the server, so the router's own cost shows."""
    from kvmesh.router.config import default_model_path
    from kvmesh.router.tokenizer import PromptTokenizer
    from kvmesh.workers.engine.sampling_params import SamplingParams
    from kvmesh.workers.service.client import WorkerClient

    tokenizer = PromptTokenizer(args.tokenizer or default_model_path())
    rng = random.Random(args.seed + 1)
    out: dict[str, list[Result]] = {"worker direct": [], "through router": []}

    def direct(prompt: str) -> Result:
        result, times = Result(ok=False, start=time.perf_counter()), []
        with WorkerClient(args.peer_worker) as client:
            sampling = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
            for output in client.generate(tokenizer.encode(prompt), sampling):
                if output.token_ids:
                    times.append(time.perf_counter())
        result.ok = bool(times)
        result.ttft = times[0] - result.start if times else 0.0
        result.itls = list(np.diff(times))
        return result

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        for i in range(args.peer_requests):
            for mode in out:
                prompt = f"Peer {i} {mode}: " + _text(rng, args.prefix_words // 2)
                if mode == "worker direct":
                    out[mode].append(await asyncio.to_thread(direct, prompt))
                else:
                    body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len,
                            "temperature": 0, "ignore_eos": True, "stream": True}
                    out[mode].append(await _stream(session, args.url + "/v1/completions", body,
                                                   time.perf_counter()))
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks against a running server")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser("serve", help="load an OpenAI-compatible server and report latencies")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--workload", choices=("shared-prefix", "multi-turn"), default="shared-prefix")
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix groups")
    p.add_argument("--prefix-words", type=int, default=200, help="words per shared prefix")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (multi-turn)")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson req/s")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="bench_serve.png", help="PNG path")
    p.add_argument("--result-json", default=None)
    p.add_argument("--peer-worker", default=None, metavar="HOST:PORT",
                   help="also time fresh prompts sent straight to this worker vs via the server")
    p.add_argument("--peer-requests", type=int, default=4)
    p.add_argument("--tokenizer", default=None, help="model file for --peer-worker prompts")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "num_groups", "prefix_words", "turns", "output_len"):
        if getattr(args, name) < 1:
            print(f"kvmesh bench serve: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.request_rate <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        print("kvmesh bench serve: rate and concurrency must be positive", file=sys.stderr)
        return 2
    args.url = args.url.rstrip("/")
    results, duration = asyncio.run(run(args))
    summary = summarize(results, duration)
    print_table(args, summary)
    plot(results, args.plot, f"{args.workload}, {len(results)} requests, "
         f"hit rate {summary['cache_hit_rate']:.0%}")
    print(f"plot: {args.plot}")
    if args.peer_worker:
        for mode, peer in asyncio.run(peer_run(args)).items():
            ok = [r for r in peer if r.ok]
            itl = [x for r in ok for x in r.itls]
            print(f"peer {mode:>15}: {len(ok)}/{len(peer)} ok, TTFT median "
                  f"{np.median([r.ttft for r in ok]) * 1e3:.0f} ms, ITL mean "
                  f"{np.mean(itl) * 1e3 if itl else 0:.0f} ms")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"},
                       **summary}, f, indent=2)
    return 0 if summary["failed"] == 0 else 1
