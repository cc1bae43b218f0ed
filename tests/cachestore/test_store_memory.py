"""Bounded memory: a real `kvmesh store` process keeps its RSS within capacity x 1.15 + 300 MB
while clients push three times its capacity through it (tensor Put and PutPages, evicting as
they go) and read pages back (GetPages inline, through a segment and mapped, GetClosest), with
and without shared memory. The peak is sampled from /proc/PID/status every 10 ms."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.store.request import PageRequest
from kvmesh.deploy.cli import command

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status"),
]

CAPACITY = 256 << 20
BOUND = int(CAPACITY * 1.15) + (300 << 20)
NUM_CLIENTS = 2
PAGES_PER_CALL = 32
# two page sizes, so arenas of both live side by side: 512 KiB and 1 MiB payloads
NS = Namespace("mem", num_layers=16, num_kv_heads=8, head_dim=64, dtype=torch.float16,
               page_size=16)
NS_ENCODED = Namespace("mem-pages", num_layers=32, num_kv_heads=8, head_dim=64,
                       dtype=torch.float16, page_size=16)
LISTENING = re.compile(r"^kvmesh store listening on (\S+):(\d+)$")


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssShmem of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssShmem"):
                out[name] = int(value.split()[0]) << 10
    return out


class PeakMemory:
    """Samples a process's memory on a thread until `stop`; keeps the sample of highest RSS."""

    def __init__(self, pid: int, period_s: float = 0.01) -> None:
        self.pid, self.period_s = pid, period_s
        self.peak = {"VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            sample = memory_of(self.pid)
            if sample["VmRSS"] > self.peak["VmRSS"]:
                self.peak = sample

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


@contextmanager
def store_process(shared_memory: bool) -> Iterator[tuple[str, int]]:
    """(target, pid) of a `kvmesh store` with a CAPACITY cpu tier; stopped on exit."""
    flag = "--shared-memory" if shared_memory else "--no-shared-memory"
    proc = subprocess.Popen([*command(), "store", "--port", "0", "--cpu-bytes", str(CAPACITY),
                             flag, "--flush-s", "0"], stdout=subprocess.PIPE, text=True)
    try:
        match = None
        for line in proc.stdout:  # type: ignore[union-attr]  # other lines may come first
            match = LISTENING.match(line.rstrip("\n"))
            if match:
                break
        assert match, "the store did not start"
        yield f"{match.group(1)}:{match.group(2)}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push(target: str, client_index: int, nbytes: int, mapped: bool) -> int:
    """One client's share: puts of `nbytes` at least, each followed by reads of what it put;
    returns the bytes put. Every read is checked against what was sent."""
    rng = np.random.default_rng(client_index)
    # [NS.num_layers, 2, tokens, NS.num_kv_heads, NS.head_dim] of one call
    kv = torch.from_numpy(rng.integers(0, 1 << 16, PAGES_PER_CALL * NS.page_nbytes // 2,
                                       dtype=np.uint16)).view(torch.float16).reshape(
        NS.num_layers, 2, PAGES_PER_CALL * NS.page_size, NS.num_kv_heads, NS.head_dim)
    payload = memoryview(kv.numpy()).cast("B")
    num_encoded = PAGES_PER_CALL // 2
    pushed = 0
    with StoreClient(target, timeout=60) as client:
        for call in range(1 << 20):
            if pushed >= nbytes:
                break
            first = (client_index << 24) + call * 10_000  # every call's tokens are new
            tokens = np.arange(first, first + PAGES_PER_CALL * NS.page_size, dtype=np.int32)
            assert client.put(tokens, kv, NS) == PAGES_PER_CALL
            req = PageRequest.of(NS_ENCODED, tokens)
            size = NS_ENCODED.page_nbytes
            pages = [(req.keys[i], encode_page(NS_ENCODED, req.keys[i], req.page_tokens(i),
                                               payload[i * size : (i + 1) * size]))
                     for i in range(num_encoded)]
            assert client.put_encoded_pages(pages) == num_encoded
            pushed += PAGES_PER_CALL * NS.page_nbytes + sum(len(blob) for _, blob in pages)
            keys = [key for key, _ in pages]
            with client.get_pages_leased(keys, mapped=mapped) as lease:
                assert [bytes(page) for page in lease.pages] == [blob for _, blob in pages]
            assert client.get_pages(keys[:4]) == [blob for _, blob in pages[:4]]
            got = client.get_closest(tokens, NS)
            assert got is not None and got.num_tokens == len(tokens)
            assert torch.equal(got.kv.view(torch.int16), kv.view(torch.int16))  # NaNs too
    return pushed


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "no-shm"])
def test_rss_stays_within_capacity_under_three_times_capacity_of_puts_and_gets(shared_memory):
    with store_process(shared_memory) as (target, pid):
        peak = PeakMemory(pid)
        pushed = [0] * NUM_CLIENTS
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                pushed[i] = push(target, i, 3 * CAPACITY // NUM_CLIENTS, mapped=shared_memory)
            except BaseException as exc:  # reported below, on the test's thread
                errors.append(exc)

        start = time.monotonic()
        clients = [threading.Thread(target=run, args=(i,)) for i in range(NUM_CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        seconds = time.monotonic() - start
        time.sleep(0.2)  # a last sample after the work
        with open(f"/proc/{pid}/maps") as maps:  # plain arenas are mmaps: torch stays out
            has_torch = "libtorch" in maps.read()
        with StoreClient(target) as client:
            (cpu,) = client.stats()
        memory = peak.stop()
    if errors:
        raise errors[0]
    mb = {name: round(value / 2**20) for name, value in memory.items()}
    print(f"\nstore cap {CAPACITY >> 20} MB, shm={shared_memory}: pushed "
          f"{sum(pushed) >> 20} MB in {seconds:.1f} s, peak MB {mb}, bound {BOUND >> 20} MB")
    assert sum(pushed) >= 3 * CAPACITY
    assert not has_torch, "the store process loaded torch"
    assert cpu.evictions > 0 and cpu.used_bytes <= CAPACITY
    assert memory["VmRSS"] <= BOUND, f"store peak RSS {mb} MB over the bound {BOUND >> 20} MB"
