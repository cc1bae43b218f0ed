"""Cost of a keyed page MAC next to the Redis GET of the same page (issue 22, item 12).

For a SmolLM2-135M page (368,640 B payload) and a Llama-3-8B page (2 MiB payload), encoded
(header + payload), measures per page: xxh3_64 (the page checksum, for scale), xxh3_128 with a
derived secret (not a cryptographic MAC), keyed BLAKE2b-256 (hashlib), HMAC-SHA256 (hashlib /
OpenSSL), the MAC the tiers use (cachestore.page_mac: Poly1305 under a one-time key, seal and
verify), and redis-py GET of the
page from a redis-server started on a free port (hiredis parser), one GET and pipelined GETs of
32 pages. Medians over --repeats; MAC rows also as % of each GET time.

    python3 benchmarks/page_mac_bench.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

import redis
import xxhash

from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.page_mac import PageMac

SHAPES = {"SmolLM2-135M": (30, 3, 64), "Llama-3-8B": (32, 8, 128)}  # layers, kv heads, dim
SECRET = b"benchmark secret, 32 bytes long!"
PIPELINE_PAGES = 32


def median_us(fn, repeats: int, per: int = 1) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / per * 1e6


def bench_shape(name: str, raw: redis.Redis, repeats: int) -> list[tuple[str, str, float]]:
    num_layers, num_kv_heads, head_dim = SHAPES[name]
    ns = Namespace(name, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   dtype="bfloat16", page_size=16)
    page = encode_page(ns, os.urandom(16), os.urandom(4 * ns.page_size),
                       os.urandom(ns.page_nbytes))
    # python-xxhash takes a 64-bit seed, not a custom secret; a seeded hash costs the same
    xxh_seed = int.from_bytes(hashlib.blake2b(SECRET, digest_size=8).digest(), "little")
    mac = PageMac(SECRET)
    sealed = page + mac.trailer(page)
    keys = [f"bench:{name}:{i}" for i in range(PIPELINE_PAGES)]
    for key in keys:
        raw.set(key, sealed)

    def pipelined_get() -> None:
        pipe = raw.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        pipe.execute()

    rows = [
        ("redis-py GET, 1 page", median_us(lambda: raw.get(keys[0]), repeats)),
        (f"redis-py GET, pipelined {PIPELINE_PAGES}",
         median_us(pipelined_get, max(5, repeats // 10), PIPELINE_PAGES)),
        ("xxh3_64 (page checksum)", median_us(lambda: xxhash.xxh3_64_intdigest(page), repeats)),
        ("xxh3_128, derived seed (not a MAC)",
         median_us(lambda: xxhash.xxh3_128_digest(page, seed=xxh_seed), repeats)),
        ("BLAKE2b-256 keyed", median_us(
            lambda: hashlib.blake2b(page, key=SECRET, digest_size=32).digest(), repeats)),
        ("HMAC-SHA256", median_us(lambda: hmac.digest(SECRET, page, "sha256"), repeats)),
        ("PageMac.trailer: Poly1305, BLAKE2b one-time key (seal)",
         median_us(lambda: mac.trailer(page), repeats)),
        ("PageMac.open (verify)", median_us(lambda: mac.open(sealed), repeats)),
    ]
    return [(name, label, us) for label, us in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly",
                             "no"], stdout=subprocess.DEVNULL)
    try:
        raw = redis.Redis(port=port)
        for _ in range(100):
            try:
                raw.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        print("| page | what | µs / page | GB/s | % of 1 GET | % of pipelined GET |")
        print("|---|---|---:|---:|---:|---:|")
        for name in SHAPES:
            rows = bench_shape(name, raw, args.repeats)
            nbytes = _page_nbytes(name)
            one_us, pipelined_us = rows[0][2], rows[1][2]
            for shape, label, us in rows:
                share = ("| |" if label.startswith("redis") else
                         f"| {100 * us / one_us:.0f}% | {100 * us / pipelined_us:.0f}% |")
                print(f"| {shape} ({nbytes / 1e6:.2f} MB) | {label} | {us:.0f} | "
                      f"{nbytes / us / 1e3:.2f} {share}", flush=True)
    finally:
        proc.terminate()
        proc.wait()


def _page_nbytes(name: str) -> int:
    num_layers, num_kv_heads, head_dim = SHAPES[name]
    return num_layers * 2 * 16 * num_kv_heads * head_dim * 2


if __name__ == "__main__":
    main()
