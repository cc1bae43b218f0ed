"""A real `kvmesh store` subprocess against clients that misbehave (hardening issue 22): a client
that shrinks its shared-memory segment during GetPages costs only its own call."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.client.breaker import CircuitBreaker
from kvmesh.cachestore.client.store_client import StoreUnavailable
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.shm import segments
from kvmesh.deploy.cli import command

LISTENING = re.compile(r"^kvmesh store listening on (127\.0\.0\.1):(\d+)$")
BIG = Namespace("big", num_layers=8, num_kv_heads=4, head_dim=64, dtype=torch.float16,
                page_size=64)  # 512 KiB pages: a 64-page copy takes milliseconds


def start_store(*args: str) -> tuple[subprocess.Popen, str]:
    """A `kvmesh store` subprocess and its target; its tier lines are read off stdout."""
    exe = shutil.which("kvmesh")
    cmd = [exe] if exe else command()
    proc = subprocess.Popen([*cmd, "store", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    match = LISTENING.match(proc.stdout.readline().rstrip("\n"))
    if not match:
        proc.kill()
        raise AssertionError(f"no listening line: {proc.communicate(timeout=30)}")
    num_tiers = 1 + ("--disk-dir" in args)
    for _ in range(num_tiers):
        assert proc.stdout.readline().strip().startswith("tier ")
    return proc, f"{match.group(1)}:{match.group(2)}"


def stop_store(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def big_pages(num_pages: int, seed: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(num_pages):
        key = rng.bytes(16)
        tokens = rng.integers(0, 50_000, BIG.page_size, dtype=np.int32).tobytes()
        pages.append((key, encode_page(BIG, key, tokens, rng.bytes(BIG.page_nbytes))))
    return pages


def test_a_client_shrinking_its_segment_during_get_pages_costs_only_its_call():
    proc, target = start_store("--cpu-bytes", "256M")
    try:
        pages = big_pages(64, seed=3)
        keys = [key for key, _ in pages]
        need = sum(len(page) for _, page in pages)
        with StoreClient(target) as client:
            assert client.put_encoded_pages(pages) == len(pages)
            segment = segments.create_segment(need)
            stop = threading.Event()

            def shrink_and_regrow() -> None:  # the misbehaving client: cut short half the time
                fd = os.open(segment.path, os.O_RDWR)
                try:
                    while not stop.is_set():
                        os.ftruncate(fd, need)
                        time.sleep(0.002)
                        os.ftruncate(fd, 0)
                        time.sleep(0.002)
                finally:
                    os.close(fd)

            shrinker = threading.Thread(target=shrink_and_regrow)
            shrinker.start()
            num_calls, num_shared, deadline = 0, 0, time.monotonic() + 3.0
            try:
                while time.monotonic() < deadline and proc.poll() is None:
                    num_calls += 1
                    try:  # the test never reads the segment: its mapping may be cut short
                        header, _ = client._page_gets.fetch(keys, False, segment)
                    except Exception:  # its own call may fail; the store must not
                        continue
                    num_shared += header.is_shared_memory  # written while being cut short
            finally:
                stop.set()
                shrinker.join()
            assert proc.poll() is None, f"the store died: {stop_store(proc)[1][-2000:]}"
            assert num_calls >= 20 and num_shared >= 1
            segment.close()
            # the store still serves, through a fresh segment and inline
            with client.get_pages_leased(keys) as lease:
                assert [bytes(p) for p in lease.pages] == [page for _, page in pages]
            with StoreClient(target, shared_memory=False) as inline:
                assert inline.get_pages(keys[:3]) == [page for _, page in pages[:3]]
        out, err = stop_store(proc)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


SMALL = Namespace("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16,
                  page_size=16)


def test_sigterm_flushes_the_cpu_tier_to_disk_and_a_restart_serves_it(tmp_path):
    tokens = list(range(1000, 1064))  # 64 tokens: 4 pages, all in the cpu tier
    kv = torch.randn(2, 2, 64, 2, 8).to(torch.float16)
    proc, target = start_store("--cpu-bytes", "16M", "--disk-dir", str(tmp_path))
    with StoreClient(target) as client:
        assert client.put(tokens, kv, SMALL) == 4
        assert [s.num_pages for s in client.stats()] == [4, 0]  # nothing on disk yet
    out, err = stop_store(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert out.strip() == "kvmesh store stopped"
    assert "copied 4 cpu-tier pages down" in err and "0 not copied" in err
    proc, target = start_store("--cpu-bytes", "16M", "--disk-dir", str(tmp_path))
    try:
        with StoreClient(target) as client:
            got = client.get_closest(tokens, SMALL)
            assert got is not None and got.num_tokens == 64 and torch.equal(got.kv, kv)
            assert got.tiers == ["disk"] * 4
    finally:
        stop_store(proc, signal.SIGINT)


def test_flush_can_be_turned_off(tmp_path):
    tokens = list(range(32))
    kv = torch.randn(2, 2, 32, 2, 8).to(torch.float16)
    proc, target = start_store("--cpu-bytes", "16M", "--disk-dir", str(tmp_path), "--flush-s", "0")
    with StoreClient(target) as client:
        assert client.put(tokens, kv, SMALL) == 2
    stop_store(proc, signal.SIGINT)
    assert proc.returncode == 0
    proc, target = start_store("--cpu-bytes", "16M", "--disk-dir", str(tmp_path))
    try:
        with StoreClient(target) as client:
            assert client.get_closest(tokens, SMALL) is None
    finally:
        stop_store(proc)


def test_idle_put_streams_cannot_starve_control_calls():
    """40 Put streams opened and left idle: past 24 (3/4 of 32 threads) they are refused at
    once, Lookup still answers well within a second, and after --stream-idle-s the idle ones
    are cancelled with DEADLINE_EXCEEDED, which frees their slots for real writers."""
    proc, target = start_store("--cpu-bytes", "16M", "--stream-idle-s", "2")
    release = threading.Event()

    def nothing():  # a client that opens a Put stream and never sends a message
        release.wait()
        yield from ()

    channel = grpc.insecure_channel(target)
    try:
        put = channel.stream_unary("/kvmesh.v1.KVStore/Put", request_serializer=bytes,
                                   response_deserializer=bytes)
        idle = [put.future(nothing(), timeout=60) for _ in range(40)]
        time.sleep(0.5)  # every stream reached the server
        tokens = list(range(32))
        with StoreClient(target, timeout=5) as client:
            for _ in range(5):
                started = time.monotonic()
                assert client.lookup(tokens, SMALL).num_tokens == 0
                assert time.monotonic() - started < 1.0
            refused = [f for f in idle if f.done()]
            assert len(refused) == 40 - 24
            assert {f.exception().code() for f in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            waited = time.monotonic()
            for future in idle:
                assert future.exception(timeout=10).code() in (
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert 1.0 < time.monotonic() - waited < 5.0
            cancelled = [f for f in idle if f not in refused]
            assert {f.exception().code() for f in cancelled} == {grpc.StatusCode.DEADLINE_EXCEEDED}
            kv = torch.randn(2, 2, 32, 2, 8).to(torch.float16)
            assert client.put(tokens, kv, SMALL) == 2  # the slots are free again
            assert torch.equal(client.get_closest(tokens, SMALL).kv, kv)
    finally:
        release.set()
        channel.close()
        out, err = stop_store(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_bulk_stream_limits_in_config():
    assert StoreConfig().bulk_streams == 24 and StoreConfig(max_workers=2).bulk_streams == 1
    assert StoreConfig(max_bulk_streams=5).bulk_streams == 5
    assert StoreConfig.from_sources({}, env={"KVMESH_STORE_MAX_BULK_STREAMS": "7",
                                             "KVMESH_STORE_STREAM_IDLE_S": "2.5"}).bulk_streams == 7
    with pytest.raises(InvalidConfig, match="max_bulk_streams must be in"):
        StoreConfig(max_bulk_streams=32)
    with pytest.raises(InvalidConfig, match="stream_idle_s must be in"):
        StoreConfig(stream_idle_s=0)
    with pytest.raises(InvalidConfig, match="max_workers must be at least 2"):
        StoreConfig(max_workers=1)


def test_a_stalled_store_is_skipped_by_the_client_breaker():
    """A store that stops answering (SIGSTOP): the first calls time out at their deadline, then
    the client's breaker fails calls at once for a while; once the store answers again, calls
    go through again."""
    proc, target = start_store("--cpu-bytes", "16M")
    breaker = CircuitBreaker(num_failures=2, open_s=1.0)
    tokens = list(range(32))
    try:
        with StoreClient(target, timeout=0.3, breaker=breaker) as client:
            assert client.lookup(tokens, SMALL).num_tokens == 0
            proc.send_signal(signal.SIGSTOP)
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    client.lookup(tokens, SMALL)
                assert time.monotonic() - started >= 0.25  # waited for its deadline
            assert breaker.is_open
            started = time.monotonic()
            for _ in range(20):
                with pytest.raises(StoreUnavailable, match="store skipped"):
                    client.stats()
                with pytest.raises(StoreUnavailable, match="store skipped"):
                    client.get_pages([bytes(16)])
            assert time.monotonic() - started < 1.0 and breaker.num_skipped == 40
            proc.send_signal(signal.SIGCONT)
            time.sleep(1.1)
            assert client.lookup(tokens, SMALL).num_tokens == 0
            assert not breaker.is_open
    finally:
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)  # running again before it is asked to stop
        stop_store(proc)


def _rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _shm_bytes_of(pid: int) -> int:
    """Bytes of /dev/shm files the process maps (its shared CPU-tier arenas count in RSS)."""
    seen: dict[str, int] = {}
    for line in open(f"/proc/{pid}/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/dev/shm/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            seen[fields[5]] = seen.get(fields[5], 0) + end - start
    return sum(seen.values())


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm-arenas", "private"])
def test_store_memory_stays_near_its_cpu_cap_under_churn(shared_memory):
    """Ten times the CPU tier's capacity put through it (evicting all the while), then read:
    the store's memory stays within its cap plus a fixed overhead, not growing with the bytes
    that passed through (it once reached 8.55 GB with a 1.6 GB cap)."""
    cap = 64 << 20
    flag = "--shared-memory" if shared_memory else "--no-shared-memory"
    proc, target = start_store("--cpu-bytes", str(cap), flag)
    try:
        baseline = _rss_bytes(proc.pid)
        ns = Namespace("churn", num_layers=8, num_kv_heads=4, head_dim=64, dtype=torch.float16,
                       page_size=16)  # 128 KiB pages
        rng = np.random.default_rng(0)
        kv = torch.from_numpy(rng.standard_normal((8, 2, 16 * 64, 4, 64)).astype(np.float16))
        with StoreClient(target, timeout=60) as client:
            for i in range(80):  # 80 x 8 MiB = 640 MiB through a 64 MiB tier
                tokens = [i] + list(range(1, 16 * 64))
                assert client.put(tokens, kv, ns) == 64
                if i % 4 == 3:
                    client.get_closest(tokens, ns)
            peak = _rss_bytes(proc.pid) - baseline
        assert peak < 2 * cap + (96 << 20), (peak >> 20, _shm_bytes_of(proc.pid) >> 20)
    finally:
        stop_store(proc)
