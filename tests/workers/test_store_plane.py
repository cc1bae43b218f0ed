"""Workers and a store they reach without shared memory (as on another host): pages move by the
NIXL data plane (or by gRPC frames under KVMESH_STORE_DATA_PLANE=grpc). One worker process
writes a prefix through; an engine here loads it straight from the client's registered receive
buffer, checked by the stager only, and its greedy output matches transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from engine_helpers import LONG, final, run, tokens_of

from kvmesh.cachestore.client.store_client import StoreClient
from kvmesh.workers.engine.sampling_params import SamplingParams

N = 16
WRITER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from kvmesh.cachestore.client.store_client import StoreClient
    from kvmesh.workers.config import WorkerConfig
    from kvmesh.workers.engine.engine import Engine
    from kvmesh.workers.engine.sampling_params import SamplingParams
    target, prompt = sys.argv[1], json.loads(sys.argv[2])
    engine = Engine(WorkerConfig(max_model_len=512, kv_cache_bytes=64 << 20))
    client = StoreClient(target, shared_memory=False, **engine.offload.segment_hooks())
    engine.attach_store(client)
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4,
                                                   ignore_eos=True))[0]
    engine.offload.flush()
    stored = [k.hex() for e in engine.pop_kv_events() if e.tier == "store" for k in e.keys]
    plane = client._plane
    written = plane.num_pages_written if plane is not None else 0
    print(json.dumps({"stored": stored, "plane": client.data_plane, "written": written}))
    engine.close()
""")


def test_a_prefix_written_by_another_worker_is_loaded_over_the_data_plane(
        store_server, make_engine, encode, hf_greedy):
    prompt = encode(LONG)
    proc = subprocess.run([sys.executable, "-P", "-c", WRITER, store_server.target,
                           json.dumps(prompt)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads(proc.stdout.strip().splitlines()[-1])
    engine = make_engine()
    client = StoreClient(store_server.target, shared_memory=False,
                         **engine.offload.segment_hooks())
    engine.attach_store(client)
    plane = client.data_plane
    assert written["plane"] == plane
    num_full = (len(prompt) + 4 - 1) // 16
    assert len(written["stored"]) == num_full
    assert written["written"] == (num_full if plane == "nixl" else 0)

    staged: list[tuple[int, bool]] = []  # (page address, is_pinned) the stager read from
    stage = engine.offload.stager.stage_unverified

    def spy(blobs, *args, is_pinned=False, addresses=None, **kwargs):
        staged.extend((memoryview(b).cast("B").obj.__array_interface__["data"][0]
                       if plane == "nixl" else 0, is_pinned) for b in blobs)
        return stage(blobs, *args, is_pinned=is_pinned, addresses=addresses, **kwargs)

    engine.offload.stager.stage_unverified = spy
    if plane == "nixl":  # as on CUDA, where segment_hooks page-lock the receive buffers
        engine.offload.pinned = _RegisteredCounts(client)
    second = prompt + encode(" and then")
    outs = run(engine, {"b": second},
               SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True))["b"]
    assert tokens_of(outs) == hf_greedy(second, N)
    assert final(outs).usage.cached_tokens_by_tier == {"store": 32}
    assert store_server.leases.num_granted == 0  # nothing read in the store's own memory
    assert len(staged) == 2
    if plane == "nixl":
        calls = client._plane
        assert (calls.num_pages_read, calls.num_pages_checked) == (2, 0)  # the stager checks
        # the stager read the pages where NIXL put them: no copy out of the receive buffer
        buffers = calls._initiator._all
        assert all(any(b.address <= address < b.address + b.nbytes for b in buffers)
                   for address, _ in staged)
        assert all(is_pinned for _, is_pinned in staged)  # the direct send, no staging copy


class _RegisteredCounts:
    """A PinnedRanges stand-in (CPU): the client's registered buffers count as page-locked."""

    def __init__(self, client: StoreClient) -> None:
        self.client = client

    def covers(self, address: int, nbytes: int) -> bool:
        return self.client._plane.owns(address, nbytes)


def test_a_corrupt_page_read_over_the_plane_ends_the_hit_and_the_store_drops_it(
        store_server, make_engine, encode, hf_greedy):
    """Pages READ unchecked by the client are checked by the stager: a flipped payload byte ends
    the loaded prefix there, and the store, told with the lease's release, drops the page."""
    import ctypes
    import time

    from kvmesh.cachestore.store.page_access import is_intact

    def attach(engine):
        engine.attach_store(StoreClient(store_server.target, shared_memory=False,
                                        **engine.offload.segment_hooks()))
        return engine

    writer = attach(make_engine())
    prompt = encode(LONG)
    run(writer, {"a": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    writer.offload.flush()
    key = writer.namespace().page_keys(prompt)[1]
    tier = store_server.store.tiers[0]
    byte = ctypes.c_ubyte.from_address(tier._addresses[key] + len(tier._pages[key]) - 1)
    byte.value ^= 1
    engine = attach(make_engine())
    outs = run(engine, {"b": prompt},
               SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True))["b"]
    assert tokens_of(outs) == hf_greedy(prompt, N)
    assert final(outs).usage.cached_tokens_by_tier == {"store": 16}  # page 0 only
    engine.offload.flush()  # the recomputed page is stored again once the bad one is gone
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        (blob,) = tier.get_many([key])
        if blob is not None and is_intact(key, blob):
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the corrupt page is still in the store")
