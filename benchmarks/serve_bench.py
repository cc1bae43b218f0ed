"""The serving path, three ways, in one run (issue 19): the same model folder, prompts and output
length through
  engine  an in-process `Engine` (add_request / step), in a process of its own;
  grpc    a `kvmesh worker` (with a `kvmesh store` behind it, as under serve) over gRPC, driven
          by WorkerClient streams;
  http    `kvmesh serve --workers 1` (store, worker, router), streamed completions.
Each at every --concurrency, closed loop. grpc and http load comes from --client-procs spawned
processes, whose CPU is reported beside every server process's (psutil), so a saturated client
shows. Every run's prompts are the same but for their first token, so no run hits another's
prefix cache. Prints a table, writes serve_bench.{json,csv} to --out.

  python benchmarks/serve_bench.py --model smollm2 --device cpu --num-prompts 32 \\
      --prompt-len 128 --output-len 32 --concurrency 8 32 --out /tmp/sb
  python benchmarks/serve_bench.py --make-model 1b /tmp/llama-1b --device cuda \\
      --num-prompts 512 --prompt-len 500 --output-len 256 --concurrency 64 256 --out /tmp/sb

--make-model 1b|8b DIR writes a random-weight folder of those Llama shapes with the SmolLM2
tokenizer (benchmarks/model_folders.py; no hub needed) unless DIR has one, and serves it.
ITL is the gap between deliveries (a step's output, a gRPC message, an SSE chunk), as vLLM's
bench counts it.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
from serve_bench_load import Run, client_run, engine_run

WAYS = ("engine", "grpc", "http")
START_DELAY_S = 2.0  # client processes start together this long after the run is set up
SERVE_START_TIMEOUT_S = 900.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help='"smollm2", a HF folder or a .gguf')
    ap.add_argument("--make-model", nargs=2, metavar=("SHAPE", "DIR"),
                    help="build a random-weight Llama folder (1b or 8b shapes, SmolLM2 "
                         "tokenizer) in DIR if absent, and serve it")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="the engine's batch limit")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the engine's token budget per step (chunked prefill); the worker's "
                         "default if not given")
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="greedy decode steps per window (the worker's default if not given)")
    ap.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    ap.add_argument("--grpc-server", choices=("sync", "aio"), default=None,
                    help="the worker's gRPC server (kvmesh worker --grpc-server; its default if "
                         "not given)")
    ap.add_argument("--grpc-without-store", action="store_true",
                    help="the grpc way's worker runs without a store (no write-through), as the "
                         "in-process engine does: what the store's write-through costs the worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("serve_bench_out"))
    return ap.parse_args(argv)


def resolve_model(args: argparse.Namespace) -> tuple[str, Path]:
    """(what --model the parts get, the HF folder whose tokenizer gives the vocabulary)."""
    from kvmesh.workers.models.loader import hf_folder_for

    if args.make_model:
        from model_folders import make_folder

        shape, folder = args.make_model
        tokenizer_dir = hf_folder_for("smollm2")[0]
        make_folder({"1b": "llama-1b", "8b": "llama-8b"}[shape], Path(folder), tokenizer_dir)
        return str(Path(folder).resolve()), Path(folder)
    return args.model, hf_folder_for(args.model)[0]


def make_prompts(folder: Path, num: int, length: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(folder))
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def salted(prompts: list[list[int]], run_index: int) -> list[list[int]]:
    """The prompts with a first token of this run's own: no page is shared between runs."""
    return [[100 + run_index, *p[1:]] for p in prompts]


# ---- the three ways -----------------------------------------------------------------------

def engine_levels(model: str, device: str, limits: dict[str, int | str],
                  runs: list[list[list[int]]], output_len: int, levels: list[int]) -> list[Run]:
    """In a spawned process: load the Engine, warm it up, one Run per level. `limits`: the
    WorkerConfig batch limits given on the command line."""
    from kvmesh.workers.config import WorkerConfig
    from kvmesh.workers.engine.engine import Engine

    engine = Engine(WorkerConfig(model=model, device=device, **limits))
    engine_run(engine, [p[:32] for p in runs[0][:8]], 4, 8, "warmup")
    return [engine_run(engine, prompts, output_len, level, f"run{i}")
            for i, (prompts, level) in enumerate(zip(runs, levels, strict=True))]


def batch_limits(args: argparse.Namespace) -> dict[str, int | str]:
    """The worker settings given on the command line, as WorkerConfig fields."""
    limits: dict[str, int | str] = {"max_num_seqs": args.max_num_seqs}
    for name in ("max_num_batched_tokens", "decode_steps", "grpc_server"):
        if getattr(args, name) is not None:
            limits[name] = getattr(args, name)
    return limits


def limit_flags(args: argparse.Namespace, sep: str = "") -> list[str]:
    """batch_limits as `kvmesh worker` flags: ["--max-num-seqs", "64"], or joined with `sep`."""
    flags = []
    for name, value in batch_limits(args).items():
        flag = "--" + name.replace("_", "-")
        flags += [f"{flag}{sep}{value}"] if sep else [flag, str(value)]
    return flags


@contextmanager
def grpc_backend(args: argparse.Namespace, model: str):
    """A `kvmesh store` and a `kvmesh worker` (auth on, as under serve): (target, token,
    {label: process})."""
    from kvmesh.deploy.internal_auth import DeploymentSecrets, new_token
    from kvmesh.deploy.local_children import start, stop, wait_ready

    secrets = DeploymentSecrets(new_token(), new_token(), {})
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        store = start("store", ["store", "--port", "0", "--disk-dir", tmp], secrets.store_env())
        children = [store]
        try:
            wait_ready([store], SERVE_START_TIMEOUT_S, threading.Event())
            threads = ["--torch-threads", str(len(os.sched_getaffinity(0)))]
            store_flags = [] if args.grpc_without_store else ["--store", str(store.address)]
            worker = start("worker", ["worker", "--port", "0", "--model", model, "--device",
                                      args.device, *store_flags,
                                      *limit_flags(args),
                                      *(threads if args.device == "cpu" else [])],
                           secrets.worker_env())
            children.append(worker)
            wait_ready([worker], SERVE_START_TIMEOUT_S, threading.Event())
            yield str(worker.address), secrets.internal_token, {
                c.name: psutil.Process(c.process.pid) for c in children}
        finally:
            stop(list(reversed(children)))


@contextmanager
def http_backend(args: argparse.Namespace, model: str):
    """`kvmesh serve --workers 1` (no API keys): (url, "", {label: process})."""
    from kvmesh.deploy.cli import command

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        argv = command("serve", "--port", "0", "--model", model, "--device", args.device,
                       "--workers", "1", "--data-dir", tmp,
                       *(f"--worker-arg={flag}" for flag in limit_flags(args, "=")))
        log = open(Path(tmp) / "serve.log", "w")  # noqa: SIM115 - closed below
        serve = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                 start_new_session=True)
        try:
            assert serve.stdout is not None
            line = serve.stdout.readline()  # its only stdout line, once every part listens
            match = re.match(r"kvmesh serving on (\S+)", line)
            if match is None:
                serve.wait(30)
                raise RuntimeError(f"kvmesh serve did not start:\n{Path(log.name).read_text()}")
            parent = psutil.Process(serve.pid)
            procs = {"serve": parent, **{_role(p): p for p in parent.children(recursive=True)}}
            yield match.group(1), "", procs
        finally:
            serve.terminate()
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
            log.close()


def _role(process: psutil.Process) -> str:
    argv = process.cmdline()
    if "kvmesh.router.cli" in argv:  # a serving process of `kvmesh router --processes N`
        return f"router process {process.pid}"
    index = argv.index("kvmesh.deploy.cli") if "kvmesh.deploy.cli" in argv else -1
    return argv[index + 1] if 0 <= index < len(argv) - 1 else process.name()


def _cpu_s(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for label, p in procs.items():
        times = p.cpu_times()
        out[label] = times.user + times.system + times.children_user + times.children_system
    return out


def client_level(pool: ProcessPoolExecutor, way: str, target: str, token: str,
                 prompts: list[list[int]], output_len: int, concurrency: int, num_procs: int,
                 server: dict[str, psutil.Process], tag: str) -> Run:
    """`concurrency` requests in flight, split over `num_procs` client processes."""
    num_procs = min(num_procs, concurrency)
    shares = [concurrency // num_procs + (i < concurrency % num_procs) for i in range(num_procs)]
    start_at = time.time() + START_DELAY_S
    futures = [pool.submit(client_run, way, target, token, prompts[i::num_procs], output_len,
                           shares[i], start_at, f"{tag}p{i}") for i in range(num_procs)]
    time.sleep(max(0.0, start_at - time.time()))
    before = _cpu_s(server)
    results = [f.result() for f in futures]
    after = _cpu_s(server)
    wall = max(end for _, _, end in results) - start_at
    cpu = {label: after[label] - before[label] for label in server}
    cpu["clients"] = sum(c for _, c, _ in results)
    cpu["client_max"] = max(c for _, c, _ in results)
    return Run([t for timings, _, _ in results for t in timings], wall, cpu)


# ---- report --------------------------------------------------------------------------------

def summarize(way: str, concurrency: int, run: Run) -> dict:
    ok = [t for t in run.timings if not t.error]
    ms = lambda values, q: float(np.percentile(values, q) * 1e3) if values else float("nan")  # noqa: E731
    ttft = [t.ttft for t in ok]
    itl = [x for t in ok for x in t.itls]
    return {"way": way, "concurrency": concurrency, "ok": len(ok),
            "failed": len(run.timings) - len(ok), "wall_s": run.wall_s,
            "output_tokens": sum(t.output_tokens for t in ok),
            "output_tok_s": sum(t.output_tokens for t in ok) / run.wall_s,
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99),
            "cpu_pct": {k: round(100 * v / run.wall_s, 1) for k, v in run.cpu_s.items()},
            "errors": sorted({t.error for t in run.timings if t.error})[:3]}


def print_table(rows: list[dict]) -> None:
    print(f"{'way':<7}{'conc':>5}{'ok':>5}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}"
          f"{'p99':>8}  CPU % of a core")
    for r in rows:
        cpu = " ".join(f"{k} {v:.0f}" for k, v in r["cpu_pct"].items())
        print(f"{r['way']:<7}{r['concurrency']:>5}{r['ok']:>5}{r['output_tok_s']:>9.1f}"
              f"{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>8.1f}{r['itl_p50_ms']:>9.1f}"
              f"{r['itl_p99_ms']:>8.1f}  {cpu}")
        for error in r["errors"]:
            print("   error:", error)
    engine = {r["concurrency"]: r["output_tok_s"] for r in rows if r["way"] == "engine"}
    for r in rows:
        if r["way"] != "engine" and r["concurrency"] in engine:
            print(f"{r['way']} / engine at concurrency {r['concurrency']}: "
                  f"{r['output_tok_s'] / engine[r['concurrency']]:.0%}")


def write_out(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    labels = sorted({k for r in rows for k in r["cpu_pct"]})
    with open(out / "serve_bench.csv", "w", newline="") as f:
        writer = csv.writer(f)
        fields = [k for k in rows[0] if k not in ("cpu_pct", "errors")]
        writer.writerow(fields + [f"cpu_pct_{k}" for k in labels])
        for r in rows:
            writer.writerow([r[k] for k in fields] + [r["cpu_pct"].get(k, "") for k in labels])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, folder = resolve_model(args)
    prompts = make_prompts(folder, args.num_prompts, args.prompt_len, args.seed)
    levels = list(args.concurrency)
    meta = {"argv": sys.argv, "model": model, "device": args.device, "host": platform.node(),
            "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_before": os.getloadavg()}
    spawn = multiprocessing.get_context("spawn")
    rows, run_index = [], 0
    for way in args.ways:
        runs = [salted(prompts, run_index + i) for i in range(len(levels))]
        run_index += len(levels) + 1
        if way == "engine":
            with ProcessPoolExecutor(1, mp_context=spawn) as one:
                results = one.submit(engine_levels, model, args.device, batch_limits(args),
                                     runs, args.output_len, levels).result()
            rows += [summarize(way, c, r) for c, r in zip(levels, results, strict=True)]
            continue
        backend = grpc_backend if way == "grpc" else http_backend
        with backend(args, model) as (target, token, server), \
                ProcessPoolExecutor(args.client_procs, mp_context=spawn) as pool:
            warm = salted(prompts[:8], run_index - 1)  # warm-up: spawn, imports, first steps
            client_level(pool, way, target, token, [p[:32] for p in warm], 4,
                         min(8, args.client_procs * 2), args.client_procs, server, "warm")
            for i, level in enumerate(levels):
                run = client_level(pool, way, target, token, runs[i], args.output_len, level,
                                   args.client_procs, server, f"{way}{i}")
                rows.append(summarize(way, level, run))
                print_table(rows[-1:])
    meta["loadavg_after"] = os.getloadavg()
    print(f"\n{meta['date']}  {meta['platform']}  {meta['cpus']} CPUs  load average before "
          f"{meta['loadavg_before']} after {meta['loadavg_after']}")
    print_table(rows)
    write_out(args.out, meta, rows)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
