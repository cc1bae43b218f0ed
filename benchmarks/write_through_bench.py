"""Write-through speed of the P/D handoff: a prefill worker's StoreWriter putting a prompt's
pages into a same-host `kvmesh store` (shared-memory puts), from `write_through` to `flush()`.

The writer reads host rows of a real `PoolPages` on CPU (the engine's pool class; on CPU its
`copy_to_host` is one plain batched copy), so what is timed is the writer thread's path: encode
or header writes, ReservePages, copies into the store's /dev/shm slots, CommitPages (where the
store checks the header and xxh3 of every page before it becomes visible). Shapes:
  llama1b  Llama-3.2-1B bf16: 16 layers x 2 x 16 tokens x 8 kv heads x 64 = 512 KiB a page
  smollm2  SmolLM2-135M fp32: 30 layers x 2 x 16 tokens x 3 kv heads x 64 = 720 KiB a page
Each trial writes pages under fresh tokens (nothing already stored) and deletes them after;
one warm-up trial is not counted; the median of --repeats is reported, with the store
process's CPU seconds and a breakdown of the writer thread's time (wall seconds inside each
stage, summed over trials, divided by trials).

    python -P benchmarks/write_through_bench.py [--shapes llama1b:512,smollm2:64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.client import shm_puts, slot_fill, store_client
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.keys import tokens_to_bytes
from kvmesh.workers.offload import store_writer
from kvmesh.workers.runner.kv_pool import PoolPages

SHAPES = {  # name: (num_layers, num_kv_heads, head_dim, dtype)
    "llama1b": (16, 8, 64, torch.bfloat16),
    "smollm2": (30, 3, 64, torch.float32),
}
# stages of the writer thread's path, timed: (label, owner, attribute)
STAGES: list[tuple[str, Any, str]] = [
    ("encode", store_client, "encode_page"),  # (the fallback of put_pages_from)
    ("send", store_writer.StoreWriter, "_send"),
    ("put_pages_from", StoreClient, "put_pages_from"),
    ("fill", shm_puts.SharedPuts, "_fill"),
    ("commit send", shm_puts, "_Commit"),
    ("check", store_client, "check_payload_pages"),
    ("reserve wait", shm_puts.SharedPuts, "_slots"),
    ("map", shm_puts.SharedPuts, "_map"),
    ("copy encoded", slot_fill, "copy_many"),
    ("copy+hash in slot", slot_fill.PayloadPages, "fill"),
    ("commit wait", shm_puts.SharedPuts, "_land"),
]
ENCODED_BATCH = 32  # pages per put_encoded_pages call of the encoded writer (the old one)


def encode(ns: Namespace, key: bytes, token_ids: list[int], row: torch.Tensor) -> bytes:
    payload = memoryview(row.view(-1).view(torch.uint8).numpy())
    return encode_page(ns, key, tokens_to_bytes(token_ids), payload)


class EncodedWriter(store_writer.StoreWriter):
    """The write-through as it was before put_pages_from: every page encoded into a new bytes
    object (header + payload copy + xxh3), then put_encoded_pages ENCODED_BATCH pages a call."""

    def _send(self, item: Any, indices: range) -> None:
        for start in range(indices.start, indices.stop, ENCODED_BATCH):
            t0 = time.perf_counter()
            pages = [(item.keys[i], encode(item.ns, item.keys[i], item.token_ids[i],
                                           item.rows[i]))
                     for i in range(start, min(start + ENCODED_BATCH, indices.stop))]
            TIMERS.add("encode", time.perf_counter() - t0)
            self.store.put_encoded_pages(pages)


class StageTimers:
    """Wall seconds spent inside each stage (all threads), by writer, while installed."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.writer = ""  # whose time is being counted
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    def add(self, label: str, seconds: float) -> None:
        if self.writer:
            with self._lock:
                self.seconds[self.writer, label] += seconds

    def install(self) -> None:
        for label, owner, name in STAGES:
            fn = getattr(owner, name)
            self._saved.append((owner, name, fn))
            setattr(owner, name, self._timed(label, fn))

    def remove(self) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()

    def _timed(self, label: str, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - t0)

        return run


TIMERS = StageTimers()
WRITERS = {"encoded (before)": EncodedWriter, "in slot (put_pages_from)": store_writer.StoreWriter}


def start_store(cpu_bytes: int) -> tuple[subprocess.Popen, str]:
    cmd = [shutil.which("kvmesh") or "kvmesh", "store", "--port", "0", "--cpu-bytes",
           str(cpu_bytes), "--data-plane", "grpc"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    match = re.match(r"kvmesh store listening on (\S+)", proc.stdout.readline())
    if not match:
        proc.kill()
        sys.exit("store did not start")
    return proc, match.group(1)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run_shape(client: StoreClient, store_pid: int, shape: str, num_pages: int,
              repeats: int) -> list[dict[str, Any]]:
    """Every writer in turn each trial (the order rotating), after one warm-up trial."""
    num_layers, num_kv_heads, head_dim, dtype = SHAPES[shape]
    ns = Namespace(f"wt-bench-{shape}", num_layers=num_layers, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, dtype=dtype, page_size=16)
    pool = PoolPages(num_pages, ns.page_shape, dtype, torch.device("cpu"))
    raw = pool.kv_pool.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
    writers = {name: make(client, pool, lambda event: None) for name, make in WRITERS.items()}
    rng = np.random.default_rng(0)
    times: dict[str, dict[str, list[float]]] = {
        name: defaultdict(list) for name in writers}
    try:
        for trial in range(repeats + 1):
            names = list(writers)
            names = names[trial % len(names):] + names[: trial % len(names)]
            for name in names:
                writer = writers[name]
                tokens = rng.integers(0, 50_000, num_pages * 16).tolist()
                keys = ns.page_keys(tokens)
                pages = [(key, tokens[16 * i : 16 * i + 16], i) for i, key in enumerate(keys)]
                TIMERS.writer = f"{shape}/{name}" if trial else ""
                cpu0 = cpu_seconds(store_pid)
                t0 = time.perf_counter()
                writer.write_through(ns, pages)
                t1 = time.perf_counter()
                writer.flush()
                t2 = time.perf_counter()
                cpu1 = cpu_seconds(store_pid)
                TIMERS.writer = ""
                if writer.num_errors or writer.num_dropped:
                    sys.exit(f"{shape} {name}: {writer.num_errors} errors, "
                             f"{writer.num_dropped} dropped")
                if client.has_pages(keys) != [True] * num_pages:
                    sys.exit(f"{shape} {name}: not every page was stored")
                client.delete_pages(keys)
                if trial:
                    for label, value in (("call", t1 - t0), ("writer", t2 - t1),
                                         ("total", t2 - t0), ("store cpu", cpu1 - cpu0)):
                        times[name][label].append(value)
    finally:
        for writer in writers.values():
            writer.close()
    nbytes = num_pages * ns.page_nbytes
    rows = []
    for name in writers:
        med = {label: statistics.median(values) for label, values in times[name].items()}
        stages = {label: 1e3 * seconds / repeats
                  for (who, label), seconds in TIMERS.seconds.items()
                  if who == f"{shape}/{name}"}
        rows.append({"shape": shape, "writer": name, "pages": num_pages, "MB": nbytes / 1e6,
                     "call ms": 1e3 * med["call"], "writer ms": 1e3 * med["writer"],
                     "total ms": 1e3 * med["total"], "writer GB/s": nbytes / med["writer"] / 1e9,
                     "store cpu s": med["store cpu"], "stages ms": stages})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama1b:512,smollm2:64",
                    help="name:pages, comma-separated (names: " + ", ".join(SHAPES) + ")")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-mib", type=int, default=shm_puts.BATCH_NBYTES >> 20,
                    help="pages per shared-memory reservation, MiB (shm_puts.BATCH_NBYTES)")
    ap.add_argument("--writers", default=",".join(WRITERS),
                    help="comma-separated, of: " + ", ".join(WRITERS))
    args = ap.parse_args()
    shm_puts.BATCH_NBYTES = args.batch_mib << 20
    for name in set(WRITERS) - set(args.writers.split(",")):
        del WRITERS[name]
    shapes = [(name, int(n)) for name, n in (s.split(":") for s in args.shapes.split(","))]
    most = max(n * 2 * SHAPES[name][0] * 2 * 16 * SHAPES[name][1] * SHAPES[name][2]
               * SHAPES[name][3].itemsize for name, n in shapes)
    print(f"load average before: {os.getloadavg()}")
    proc, target = start_store(most + (64 << 20))
    rows = []
    TIMERS.install()
    try:
        with StoreClient(target) as client:
            for name, num_pages in shapes:
                rows += run_shape(client, proc.pid, name, num_pages, args.repeats)
    finally:
        TIMERS.remove()
        proc.terminate()
        proc.wait(timeout=30)
    print(f"load average after: {os.getloadavg()}")
    print("| shape | writer | pages | MB | write_through ms | writer ms (after it) | "
          "writer GB/s | to flush ms | store CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['writer']} | {r['pages']} | {r['MB']:.0f} | "
              f"{r['call ms']:.1f} | {r['writer ms']:.1f} | {r['writer GB/s']:.2f} | "
              f"{r['total ms']:.1f} | {r['store cpu s']:.3f} |")
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages ms"].items())
        print(f"{r['shape']}, {r['writer']}: writer-thread ms per trial: {stages}")


if __name__ == "__main__":
    main()
