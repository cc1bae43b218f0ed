"""The CUDA path (Triton kernels, CUDA-graph decode) on a tiny random Llama in fp32 against
transformers' generate on the same weights, and graphs against eager. Run on the device."""

from __future__ import annotations

import ctypes

import pytest
import torch
from tiny_models import (
    NEW,
    NEW_FAMILIES,
    PROMPTS,
    WINDOW_NEW,
    WINDOW_PROMPTS,
    build,
    hf_greedy,
    windowed_greedy,
)

from kvmesh.cachestore.shm.segments import buffer_address
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.engine import Engine
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.models.loader import LoadedModel

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA (run them on the device with -m gpu)")
    hf, loaded = build()
    hf = hf.to("cuda")
    state = hf.state_dict()
    return hf, LoadedModel(loaded.model_id, loaded.config, state, None, "tiny-seed0", "none",
                           loaded.folder)


def run(loaded: LoadedModel, enforce_eager: bool, **kw) -> list[list[int]]:
    config = WorkerConfig(model="tiny", device="cuda", dtype="float32", page_size=8,
                          kv_cache_bytes=8 << 20, max_num_seqs=8, max_num_batched_tokens=24,
                          max_model_len=256, enforce_eager=enforce_eager, **kw)
    engine = Engine(config, loaded=loaded)
    assert (engine.runner.graphs is None) == enforce_eager
    return engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=NEW,
                                                   ignore_eos=True))


@pytest.mark.parametrize("decode_steps", [1, 8])
def test_cuda_graphs_and_eager_match_transformers(tiny_cuda, decode_steps):
    """decode_steps 8: greedy steps replayed back to back, tokens fed back on the device."""
    hf, loaded = tiny_cuda
    expected = [hf_greedy(hf, p, NEW) for p in PROMPTS]
    assert run(loaded, enforce_eager=True, decode_steps=decode_steps) == expected
    assert run(loaded, enforce_eager=False, decode_steps=decode_steps) == expected


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_family_through_graphs_and_eager_matches_transformers(family):
    """Qwen2's bias (added to the first split-K partial), Qwen3's q/k norm and the sliding
    windows (Mistral's on every layer, Qwen2's on some) inside the captured graphs and the
    multi-step windows, eager beside them."""
    hf, loaded = build(family)
    hf = hf.to("cuda")
    loaded = LoadedModel(loaded.model_id, loaded.config, hf.state_dict(), None,
                         loaded.weights_fingerprint, "none", loaded.folder)
    expected = [hf_greedy(hf, p, NEW) for p in PROMPTS]
    for decode_steps in (1, 8):
        assert run(loaded, enforce_eager=True, decode_steps=decode_steps) == expected
        assert run(loaded, enforce_eager=False, decode_steps=decode_steps) == expected
    tokens, _, _, graphs = windowed_greedy(loaded, 5, "cuda")
    assert graphs and tokens == [hf_greedy(hf, p, WINDOW_NEW) for p in WINDOW_PROMPTS]


@pytest.mark.parametrize("decode_steps", [3, 5])
def test_cuda_graph_windows_continue_at_every_page_offset(tiny_cuda, decode_steps):
    """Continued windows through the graphs: the new pages reach the device table and the
    first slot is recomputed before the window's first replay (test_engine_tiny has the CPU
    twin)."""
    hf, loaded = tiny_cuda
    tokens, continued, early_schedules, graphs = windowed_greedy(loaded, decode_steps, "cuda")
    assert graphs and continued >= WINDOW_NEW // decode_steps - 2 and early_schedules == 0
    assert tokens == [hf_greedy(hf, p, WINDOW_NEW) for p in WINDOW_PROMPTS]


def test_cuda_graph_multistep_stops_inside_a_window(tiny_cuda):
    hf, loaded = tiny_cuda
    # a prompt whose greedy output has a first occurrence past the first window's start
    cases = [(p, full, i) for p in PROMPTS for full in [hf_greedy(hf, p, NEW)]
             for i in range(2, NEW) if full[i] not in full[:i]]
    assert cases, "no output token occurs first after position 1"
    prompt, full, stop_at = cases[-1]
    config = WorkerConfig(model="tiny", device="cuda", dtype="float32", page_size=8,
                          kv_cache_bytes=8 << 20, max_num_seqs=8, max_model_len=256,
                          decode_steps=8)
    engine = Engine(config, loaded=loaded)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True,
                            stop_token_ids=[full[stop_at]])
    assert engine.generate([prompt], params)[0] == full[: stop_at + 1]
    assert engine.stats().num_pages_free == engine.stats().num_pages_total


@pytest.mark.parametrize("corrupt", [False, True])
def test_cuda_host_tier_reload_matches(tiny_cuda, corrupt):
    """The step computes on host-tier pages while their checksums run on the device; a corrupt
    one is caught after the forward, the sequence rewound to it, and the output still matches."""
    hf, loaded = tiny_cuda
    page_nbytes = 2 * 2 * 8 * 2 * 16 * 4
    config = WorkerConfig(model="tiny", device="cuda", dtype="float32", page_size=8,
                          kv_cache_bytes=14 * page_nbytes, host_tier_bytes=1 << 20,
                          max_num_seqs=8, max_model_len=256)
    engine = Engine(config, loaded=loaded)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    long = PROMPTS[2]
    engine.generate([long], params)
    engine.generate([PROMPTS[1] + [5] * 40], params)  # evicts the long prompt's pages
    host = engine.offload.host
    keys = engine.namespace().page_keys(long + [9, 9])
    held = [k for k, found in zip(keys, host.contains_many(keys), strict=True) if found]
    assert held  # demoted pages the next request loads
    if corrupt:  # a payload byte of the deepest one: only the checksum can tell
        (blob,) = host.get_many(held[-1:])
        ctypes.c_ubyte.from_address(buffer_address(blob)[0] + len(blob) - 1).value ^= 0x40
    rewinds = []
    finish_loads = engine.scheduler.finish_loads
    engine.scheduler.finish_loads = lambda: rewinds.append(finish_loads()) or rewinds[-1]
    graphs = engine.runner.graphs
    by_layer_runs = []  # replays through the graphs a layer run at a time
    run_by_layer_runs = graphs.run_by_layer_runs
    graphs.run_by_layer_runs = lambda *a, **k: (by_layer_runs.append(len(a[0]))
                                                or run_by_layer_runs(*a, **k))
    out = engine.generate([long + [9, 9]], params)[0]
    assert engine.stats().prefix_hits["cpu"] >= len(held) - corrupt
    assert out == hf_greedy(hf, long + [9, 9], NEW)
    # the hit's step ran a layer run at a time as they came in
    assert by_layer_runs and len(graphs.layer_runs) == 2
    # the bad page is found after the step that computed on it: rewound, and dropped
    assert any(rewinds) == corrupt
    assert host.contains_many(held[-1:]) == [not corrupt]


def test_prefix_hit_suffix_runs_through_the_decode_graph(tiny_cuda):
    """A device prefix hit leaves a 3-token suffix: it is replayed as 3 decode rows of one
    captured graph (causal by per-row lengths) and still matches transformers."""
    hf, loaded = tiny_cuda
    config = WorkerConfig(model="tiny", device="cuda", dtype="float32", page_size=8,
                          kv_cache_bytes=8 << 20, max_num_seqs=8, max_model_len=256)
    engine = Engine(config, loaded=loaded)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    prefix = PROMPTS[2][:64]
    engine.generate([prefix], params)
    graphs = engine.runner.graphs
    calls = []
    run_graph = graphs.run
    graphs.run = lambda *a, **k: calls.append(len(a[0])) or run_graph(*a, **k)
    prompt = prefix + [5, 6, 7]
    assert engine.generate([prompt], params)[0] == hf_greedy(hf, prompt, NEW)
    assert calls and calls[0] == 3  # the suffix's 3 tokens, one replay
    assert engine.stats().prefix_hits["device"] >= 8



def recorded(engine):
    """(per store read: whether it was read in place; per stage call with pages: whether they
    lay in page-locked memory), as the engine goes on."""
    reads, staged = [], []
    stage = engine.offload.stager.stage_unverified

    def recording_stage(blobs, *a, **k):
        if len(blobs):
            staged.append(k["is_pinned"])
        return stage(blobs, *a, **k)

    engine.offload.stager.stage_unverified = recording_stage
    get = engine.offload.store.get_pages_leased

    def recording_get(*a, **k):
        lease = get(*a, **k)
        reads.append(lease.valid_until is not None)
        return lease

    engine.offload.store.get_pages_leased = recording_get
    return reads, staged


def wait_pinned(engine, mapped, timeout_s=30.0):
    import time

    deadline = time.monotonic() + timeout_s
    while (not all(engine.offload.pinned.covers(m.address, m.nbytes) for m in mapped)
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert all(engine.offload.pinned.covers(m.address, m.nbytes) for m in mapped)


def test_store_hit_read_in_place_from_page_locked_arenas_matches(tiny_cuda):
    """A store on this host lets the worker read its pages where it keeps them (mapped arenas
    in /dev/shm). The worker page-locks each arena it maps (cudaHostRegister, in the
    background); until that is done it takes the store's copy into its own page-locked
    segment, afterwards hits go straight from the arena to the GPU by DMA, verified there. The
    output matches transformers either way. A worker that wrote the pages itself maps their
    arenas as it writes, so even its first hit reads them in place."""
    from kvmesh.cachestore.config import StoreConfig
    from kvmesh.cachestore.rpc.server import StoreServer

    hf, loaded = tiny_cuda
    server = StoreServer(StoreConfig(port=0, cpu_bytes=64 << 20))
    try:
        config = WorkerConfig(model="tiny", device="cuda", dtype="float32", page_size=8,
                              kv_cache_bytes=8 << 20, max_num_seqs=8, max_model_len=256,
                              store=server.target)
        params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
        long = PROMPTS[2]
        writer = Engine(config, loaded=loaded)
        writer.generate([long], params)
        writer.offload.flush()
        written = writer.offload.store._segments.arenas
        assert written.names  # mapped as the pages were written
        wait_pinned(writer, [written._mapped[name] for name in written.names])
        writer.block_manager.release(writer.block_manager.allocate(
            writer.block_manager.num_free_pages))
        own_reads, own_staged = recorded(writer)
        again = long[:40] + [5]
        assert writer.generate([again], params)[0] == hf_greedy(hf, again, NEW)
        assert own_reads == [True] and own_staged == [True]  # in place, by DMA
        assert writer.stats().prefix_hits["store"] == 5
        assert server.leases.num_granted == 1
        writer.close()
        reader = Engine(config, loaded=loaded)
        reads, staged = recorded(reader)
        first = long[:48] + [3]
        assert reader.generate([first], params)[0] == hf_greedy(hf, first, NEW)
        assert reader.stats().prefix_hits["store"] == 6
        # the arenas were new to this worker: not page-locked yet, so it let the store copy the
        # pages into its (page-locked) segment instead
        assert reads == [True, False] and server.leases.num_granted == 2
        arenas = reader.offload.store._segments.arenas
        mapped = [arenas._mapped[name] for name in arenas.names]
        assert mapped
        wait_pinned(reader, mapped)
        reader.block_manager.release(reader.block_manager.allocate(
            reader.block_manager.num_free_pages))  # evict: the next hit comes from the store
        second = long[:56] + [4, 4]
        assert reader.generate([second], params)[0] == hf_greedy(hf, second, NEW)
        assert reads[2:] == [True] and staged[-1] is True  # by DMA from the arena
        assert reader.stats().prefix_hits["store"] == 6 + 7
        reader.close()
    finally:
        server.stop(grace=0)
