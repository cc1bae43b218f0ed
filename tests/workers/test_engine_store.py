"""Prefix reuse through the shared store: one worker process writes its pages through to a real
KVStore gRPC server; an engine in this process loads them instead of prefilling, and its greedy
output still matches transformers. A store that is down is a miss, not a failed request."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from engine_helpers import LONG, final, run, tokens_of, write_through_store

from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.rpc.server import StoreServer
from kvmesh.workers.engine.sampling_params import SamplingParams

N = 16


def test_prefix_written_by_another_worker_process_is_loaded_from_the_store(
        store_server, make_engine, encode, hf_greedy):
    prompt = encode(LONG)
    (written,) = write_through_store(store_server.target, [("smollm2", prompt)],
                                     max_model_len=512, kv_cache_bytes=64 << 20)
    engine = make_engine(store=store_server.target)
    computed = len(prompt) + 4 - 1
    keys = engine.namespace().page_keys(prompt)
    assert [bytes.fromhex(k) for k in written["stored"]][:2] == keys[:2]
    assert len(written["stored"]) == computed // 16
    second = prompt + encode(" and then")
    outs = run(engine, {"b": second},
               SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True))["b"]
    assert tokens_of(outs) == hf_greedy(second, N)
    assert final(outs).usage.cached_tokens_by_tier == {"store": 32}
    assert engine.stats().prefix_hits["store"] == 2
    assert store_server.leases.num_granted == 1  # read in place in the store's arenas
    # the loaded pages are now in this worker's own cache: a third request hits the device
    third = prompt + encode(" but later")
    outs = run(engine, {"c": third}, SamplingParams(temperature=0.0, max_tokens=2))["c"]
    assert final(outs).usage.cached_tokens_by_tier == {"device": 32}


def test_a_store_that_is_down_is_a_miss(make_engine, encode, hf_greedy, store_server):
    target = store_server.target
    store_server.stop(grace=0)  # nothing listens on this port any more
    engine = make_engine(store=target)
    prompt = encode(LONG)
    outs = run(engine, {"a": prompt},
               SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True))["a"]
    assert tokens_of(outs) == hf_greedy(prompt, N)
    assert final(outs).usage.cached_tokens == 0
    engine.offload.flush()
    assert engine.offload.num_store_errors > 0


def test_a_stalled_store_is_a_miss_within_its_deadline(make_engine, encode, hf_greedy, tmp_path):
    """A store that accepts connections but answers nothing (SIGSTOP): each request pays at
    most one call deadline, then the client's breaker skips the store; output is unchanged."""
    from kvmesh.deploy.cli import command
    from kvmesh.workers.engine.engine import STORE_TIMEOUT_S

    store = subprocess.Popen([*command("store", "--port", "0", "--cpu-bytes", "64M")],
                             stdout=subprocess.PIPE, text=True)
    try:
        target = store.stdout.readline().split()[-1]
        engine = make_engine(store=target)
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        os.kill(store.pid, signal.SIGSTOP)
        started = time.monotonic()
        for i in range(4):
            prompt = encode(f"{LONG} Question {i}:")
            outs = run(engine, {f"r{i}": prompt}, params)[f"r{i}"]
            assert tokens_of(outs) == hf_greedy(prompt, 4)
        # a few deadlines in all (then the breaker is open), not one or more per request
        assert time.monotonic() - started < 3 * STORE_TIMEOUT_S + 8
    finally:
        os.kill(store.pid, signal.SIGCONT)
        store.kill()
        store.wait()


def test_writes_past_the_queue_budget_are_dropped_not_waited_for(
        make_engine, encode, store_server, monkeypatch):
    """A prefill's new pages go to the writer in one batched host copy; those that would take
    the queue past its byte budget are dropped and counted, the rest still reach the store."""
    import kvmesh.workers.offload.store_writer as store_writer

    engine = make_engine(store=store_server.target)
    prompt = encode(LONG) * 3
    num_full = len(prompt) // 16
    assert num_full >= 4
    monkeypatch.setattr(store_writer, "_STORE_QUEUE_BYTES", 2 * engine.namespace().page_nbytes)
    run(engine, {"a": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    engine.offload.flush()
    assert engine.stats().num_store_writes_dropped == num_full - 2
    keys = engine.namespace().page_keys(prompt)
    assert engine.offload.store.has_pages(keys[:num_full]) == [True, True] + [False] * (
        num_full - 2)


def test_store_pages_read_after_their_lease_ended_are_a_miss(make_engine, encode, hf_greedy):
    """The store may reuse a mapped page's memory once the lease is over, so a worker that read
    it too late must not use it (here every lease is over before the reply arrives)."""
    server = StoreServer(StoreConfig(port=0, cpu_bytes=64 << 20, lease_s=1e-6))
    try:
        writer = make_engine(store=server.target)
        prompt = encode(LONG)
        run(writer, {"a": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
        writer.offload.flush()
        engine = make_engine(store=server.target)
        outs = run(engine, {"b": prompt},
                   SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True))["b"]
        assert tokens_of(outs) == hf_greedy(prompt, N)
        assert server.leases.num_granted == 1
        assert final(outs).usage.cached_tokens == 0
    finally:
        server.stop(grace=0)


def test_a_corrupt_page_read_in_place_ends_the_hit_and_the_store_drops_it(
        make_engine, encode, hf_greedy):
    """Pages read in the store's own memory are checked by the worker: a flipped payload byte
    ends the loaded prefix there, the output still matches, and the store, told about the
    page, checks it itself and drops it."""
    from kvmesh.cachestore.store.page_access import is_intact

    def intact(tier, key):
        (blob,) = tier.get_many([key])
        return blob is not None and is_intact(key, blob)

    import ctypes
    import time

    server = StoreServer(StoreConfig(port=0, cpu_bytes=64 << 20))
    try:
        writer = make_engine(store=server.target)
        prompt = encode(LONG)
        run(writer, {"a": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
        writer.offload.flush()
        keys = writer.namespace().page_keys(prompt)[:2]
        tier = server.store.tiers[0]
        page = tier._pages[keys[1]]
        byte = ctypes.c_ubyte.from_address(tier._addresses[keys[1]] + len(page) - 1)
        byte.value ^= 1
        engine = make_engine(store=server.target)
        outs = run(engine, {"b": prompt},
                   SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True))["b"]
        assert tokens_of(outs) == hf_greedy(prompt, N)
        assert final(outs).usage.cached_tokens_by_tier == {"store": 16}  # page 0 only
        assert server.leases.num_granted == 1
        # dropped, then stored again from this worker's own (recomputed) copy: a present page
        # is never overwritten by a put, so an intact page 1 means the bad one went
        engine.offload.flush()
        deadline = time.monotonic() + 5
        while not intact(tier, keys[1]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert intact(tier, keys[1])
    finally:
        server.stop(grace=0)
