"""In-process TieredStore throughput per tier (no gRPC), with the raw backend as the peer.

For SmolLM2-135M pages (368,640 B) and Llama-3-8B pages (2 MiB), over a store of one tier each
(cpu, disk, redis) measures put and get_closest (GB/s of payload: keys, verification and
copies included) and lookup latency, next to the raw backend moving the same bytes in the same
run: a numpy copy (cpu), open+write / open+read of one file per page, keeping every page read
as an answer must (disk), redis-py pipelined SET / GET of one value per page (redis, hiredis
parser). A redis-server is started on a free port, and the
disk tier writes under a temp dir (use --disk-dir to pick the file system).

    python3 benchmarks/tiers_bench.py [--pages-per-request 32] [--repeats 5] [--disk-dir DIR]
                                      [--tune-malloc]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import redis

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.malloc import keep_freed_memory
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.cachestore.tiers.disk import DiskTier
from kvmesh.cachestore.tiers.redis import RedisTier

SHAPES = {"SmolLM2-135M": (30, 3, 64), "Llama-3-8B": (32, 8, 128)}  # layers, kv heads, dim


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_shape(name: str, args, redis_url: str, raw: redis.Redis) -> list[tuple]:
    num_layers, num_kv_heads, head_dim = SHAPES[name]
    ns = Namespace(name, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   dtype="bfloat16", page_size=16)
    n = args.pages_per_request
    total = n * ns.page_nbytes
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, ns.page_nbytes, dtype=np.uint8).tobytes() for _ in range(n)]
    rows = []
    disk_dir = tempfile.mkdtemp(dir=args.disk_dir)
    stores = {
        "cpu": TieredStore([CpuTier(4 * args.repeats * total + total, pin_memory=False)]),
        "disk": TieredStore([DiskTier(disk_dir, 4 * args.repeats * total + total)]),
        "redis": TieredStore([RedisTier(redis_url)]),
    }
    for tier_name, store in stores.items():
        round_no = iter(range(10**6))

        def put_new(store=store, round_no=round_no):
            tokens = rng.integers(0, 50_000, 16 * n).tolist() + [next(round_no)]
            assert store.put(ns, tokens, payloads) == n

        tokens = rng.integers(0, 50_000, 16 * n).tolist()
        store.put(ns, tokens, payloads)
        put_s = median_seconds(put_new, args.repeats)
        get_s = median_seconds(lambda store=store, tokens=tokens: store.get_closest(ns, tokens),
                               args.repeats)
        got = store.get_closest(ns, tokens)
        assert got is not None and got.num_tokens == 16 * n
        lookup_s = median_seconds(lambda store=store, tokens=tokens: store.lookup(ns, tokens),
                                  args.repeats * 10)
        rows.append((name, tier_name, "TieredStore", total / put_s / 1e9, total / get_s / 1e9,
                     lookup_s * 1e6))
    # Peers: the raw backends moving the same bytes.
    dst = np.empty(ns.page_nbytes, dtype=np.uint8)
    copy_s = median_seconds(lambda: [dst.__setitem__(slice(None), np.frombuffer(p, np.uint8))
                                     for p in payloads], args.repeats)
    rows.append((name, "cpu", "numpy copy", total / copy_s / 1e9, total / copy_s / 1e9, None))
    files = [os.path.join(disk_dir, f"raw{i}") for i in range(n)]

    def write_files():
        for path, p in zip(files, payloads, strict=True):
            with open(path, "wb") as f:
                f.write(p)

    def read_files():  # keeps every page until the end, as a get_closest answer must
        held = []
        for path in files:
            with open(path, "rb") as f:
                held.append(f.read())
        return held

    write_s = median_seconds(write_files, args.repeats)
    read_s = median_seconds(read_files, args.repeats)
    rows.append((name, "disk", "open+write/read", total / write_s / 1e9, total / read_s / 1e9,
                 None))
    keys = [f"raw:{name}:{i}".encode() for i in range(n)]

    def raw_set():
        pipe = raw.pipeline(transaction=False)
        for k, p in zip(keys, payloads, strict=True):
            pipe.set(k, p)
        pipe.execute()

    def raw_get():
        pipe = raw.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        pipe.execute()

    set_s = median_seconds(raw_set, args.repeats)
    rget_s = median_seconds(raw_get, args.repeats)
    rows.append((name, "redis", "redis-py SET/GET", total / set_s / 1e9, total / rget_s / 1e9,
                 None))
    for store in stores.values():
        store.close()
    shutil.rmtree(disk_dir, ignore_errors=True)
    raw.flushdb()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages-per-request", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--disk-dir", default=None)
    parser.add_argument("--tune-malloc", action="store_true",
                        help="cachestore.malloc.keep_freed_memory() first")
    args = parser.parse_args()
    if args.tune_malloc and not keep_freed_memory():
        sys.exit("--tune-malloc: glibc mallopt not available")
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not on PATH: run `make test` (it installs it)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly",
                             "no", "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
    try:
        raw = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                raw.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    sys.exit("redis-server did not start")
                time.sleep(0.05)
        rows = []
        for name in SHAPES:
            rows += bench_shape(name, args, f"redis://127.0.0.1:{port}/0", raw)
    finally:
        proc.kill()
        proc.wait()
    print(f"{args.pages_per_request} pages per request, median of {args.repeats}; "
          f"cpus={os.cpu_count()}; malloc tuned: {args.tune_malloc}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| pages | tier | path | put GB/s | get GB/s | lookup us |")
    print("|---|---|---|---:|---:|---:|")
    for name, tier, path, put, get, lookup in rows:
        lookup_text = "" if lookup is None else f"{lookup:.0f}"
        print(f"| {name} | {tier} | {path} | {put:.2f} | {get:.2f} | {lookup_text} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
