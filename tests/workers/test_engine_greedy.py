"""The engine on the real SmolLM2 (fp32, CPU) against transformers' own greedy `generate`:
batched, chunked prefill, prefix hits from the device cache and the host tier, preemption, n > 1
forks with copy-on-write."""

from __future__ import annotations

import pytest
from engine_helpers import LONG, PROMPTS, final, run, tokens_of

import kvmesh.workers.offload.tier_lookup
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.errors import BatchFailed

N = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


def test_batched_chunked_prefill_matches_transformers(make_engine, encode, hf_greedy):
    engine = make_engine(max_num_batched_tokens=7)  # every prompt spans several chunks
    prompts = {f"r{i}": encode(p) for i, p in enumerate(PROMPTS)}
    assert max(len(p) for p in prompts.values()) > 2 * 7
    outs = run(engine, prompts, GREEDY)
    for rid, ids in prompts.items():
        assert tokens_of(outs[rid]) == hf_greedy(ids, N)
        last = final(outs[rid])
        assert last.finish_reason == "length"
        assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == N
        assert last.usage.cached_tokens == 0
    stats = engine.stats()
    assert stats.num_pages_free == stats.num_pages_total
    assert stats.num_running == stats.num_waiting == 0


def test_second_request_reuses_the_device_prefix(make_engine, encode, hf_greedy):
    engine = make_engine()
    first = encode(LONG)
    first_out = tokens_of(run(engine, {"a": first}, GREEDY)["a"])
    # the follow-up continues the conversation: prompt + answer + a new question
    second = first + first_out + encode(" What came next?")
    outs = run(engine, {"b": second}, GREEDY)["b"]
    assert tokens_of(outs) == hf_greedy(second, N)
    computed = len(first) + N - 1  # the last sampled token of "a" was never fed back
    expected = 16 * (computed // 16)
    usage = final(outs).usage
    assert usage.cached_tokens == expected and usage.cached_tokens_by_tier == {"device": expected}
    assert engine.stats().prefix_hits["device"] == expected // 16


def test_host_tier_hit_after_device_eviction(make_engine, encode, hf_greedy, smollm2):
    page_nbytes = 30 * 2 * 16 * 3 * 64 * 4
    engine = make_engine(kv_cache_bytes=8 * page_nbytes, host_tier_bytes=64 * page_nbytes)
    prompt = encode(LONG)
    assert 32 < len(prompt) < 48
    run(engine, {"a": prompt}, GREEDY)
    engine.pop_kv_events()
    # a different 112-token prompt needs all 8 pages: every cached page of "a" is evicted
    filler = encode("Bananas are yellow. " * 40)[:112]
    run(engine, {"filler": filler}, SamplingParams(temperature=0.0, max_tokens=N,
                                                   ignore_eos=True))
    events = engine.pop_kv_events()
    a_keys = engine.namespace().page_keys(prompt)[:2]
    removed = {k for e in events if e.kind == "removed" and e.tier == "device" for k in e.keys}
    demoted = {k for e in events if e.kind == "stored" and e.tier == "cpu" for k in e.keys}
    assert set(a_keys) <= removed and set(a_keys) <= demoted
    second = prompt + encode(" and then")
    outs = run(engine, {"b": second}, GREEDY)["b"]
    assert tokens_of(outs) == hf_greedy(second, N)
    assert final(outs).usage.cached_tokens_by_tier == {"cpu": 32}
    assert engine.stats().prefix_hits["cpu"] == 2


# first_chunk 1: the bad page comes in a later chunk (host checksums do not go in chunks)
@pytest.mark.parametrize(("device_checksums", "first_chunk"), [(False, 16), (True, 16),
                                                               (True, 1)])
def test_a_corrupt_host_tier_page_is_a_miss_and_is_dropped(make_engine, encode, hf_greedy,
                                                           device_checksums, first_chunk,
                                                           monkeypatch):
    """device_checksums (the CUDA default; kernels.xxh3, here under the Triton interpreter):
    the step computes on the loaded pages before their checksums are in, so the bad page is
    found after the forward; the sequence is rewound to it and that step's token dropped."""
    monkeypatch.setattr(kvmesh.workers.offload.tier_lookup, "_FIRST_CHUNK_PAGES", first_chunk)
    page_nbytes = 30 * 2 * 16 * 3 * 64 * 4
    engine = make_engine(kv_cache_bytes=8 * page_nbytes, host_tier_bytes=64 * page_nbytes)
    engine.offload.stager.device_checksums = device_checksums
    rewinds = []
    finish_loads = engine.scheduler.finish_loads
    engine.scheduler.finish_loads = lambda: rewinds.append(finish_loads()) or rewinds[-1]
    prompt = encode(LONG)
    run(engine, {"a": prompt}, GREEDY)
    filler = encode("Bananas are yellow. " * 40)[:112]  # evicts every page of "a" to the host
    run(engine, {"filler": filler}, GREEDY)
    host = engine.offload.host
    a_keys = engine.namespace().page_keys(prompt)[:2]
    assert host.contains_many(a_keys) == [True, True]
    corrupt = bytearray(host.get_many([a_keys[1]])[0])
    corrupt[-3] ^= 0x40  # a payload byte: only the checksum can catch it
    host.delete_many([a_keys[1]])
    host.put_many([(a_keys[1], bytes(corrupt))])
    engine.pop_kv_events()
    second = prompt + encode(" and then")
    outs = run(engine, {"b": second}, GREEDY)["b"]
    assert tokens_of(outs) == hf_greedy(second, N)
    assert final(outs).usage.cached_tokens_by_tier == {"cpu": 16}
    assert host.contains_many(a_keys) == [True, False]
    removed = {k for e in engine.pop_kv_events() if e.kind == "removed" and e.tier == "cpu"
               for k in e.keys}
    assert a_keys[1] in removed
    assert any(rewinds) == device_checksums  # found after the forward, or before


@pytest.mark.parametrize("decode_steps", [1, 4])  # 4: multi-step windows fall back when full
def test_preemption_under_a_tiny_pool_matches_unconstrained(make_engine, encode, hf_greedy,
                                                            decode_steps):
    page_nbytes = 30 * 2 * 16 * 3 * 64 * 4
    # 3 requests x 3 pages each at the end, 5 pages in the pool
    engine = make_engine(kv_cache_bytes=5 * page_nbytes, host_tier_bytes=32 * page_nbytes,
                         decode_steps=decode_steps)
    prompts = {f"p{i}": encode(p)[:20] for i, p in enumerate(PROMPTS[1:] + [LONG])}
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = run(engine, prompts, params)
    assert engine.stats().num_preemptions > 0
    for rid, ids in prompts.items():
        assert tokens_of(outs[rid]) == hf_greedy(ids, 24)
        assert final(outs[rid]).finish_reason == "length"
    assert engine.stats().num_pages_free == 5


def test_n_forks_share_the_prompt_and_copy_the_partial_page(make_engine, encode, hf_greedy):
    engine = make_engine()
    prompt = encode(PROMPTS[2])
    assert len(prompt) % 16 != 0  # the last prompt page is partial: forks must copy it
    params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, n=3)
    outs = run(engine, {"f": prompt}, params)["f"]
    expected = hf_greedy(prompt, N)
    for index in range(3):
        assert tokens_of(outs, index) == expected
        usage = final(outs, index).usage
        assert usage.completion_tokens == N and usage.prompt_tokens == len(prompt)
    assert engine.stats().num_pages_free == engine.stats().num_pages_total


def test_seeded_sampling_is_reproducible_across_engines(make_engine, encode):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=42, max_tokens=12,
                            ignore_eos=True, n=2)
    prompt = encode(PROMPTS[0])
    a = run(make_engine(), {"s": prompt}, params)["s"]
    b = run(make_engine(max_num_batched_tokens=3), {"s": prompt}, params)["s"]
    assert tokens_of(a, 0) == tokens_of(b, 0) and tokens_of(a, 1) == tokens_of(b, 1)
    assert tokens_of(a, 0) != tokens_of(a, 1)


def demoted_engine(make_engine, encode):
    """An engine whose host tier holds LONG's pages (evicted from the device), with device
    checksums on (kernels.xxh3 under the interpreter): its loads are checked after the step."""
    page_nbytes = 30 * 2 * 16 * 3 * 64 * 4
    engine = make_engine(kv_cache_bytes=8 * page_nbytes, host_tier_bytes=64 * page_nbytes)
    engine.offload.stager.device_checksums = True
    prompt = encode(LONG)
    run(engine, {"a": prompt}, GREEDY)
    run(engine, {"filler": encode("Bananas are yellow. " * 40)[:112]}, GREEDY)
    keys = engine.namespace().page_keys(prompt)[:2]
    assert engine.offload.host.contains_many(keys) == [True, True]
    return engine, prompt, keys


def test_requests_sharing_a_loading_prefix_load_it_once(make_engine, encode, hf_greedy):
    """The second request waits a step for the first one's load to be checked and cached,
    then takes the pages from the device cache instead of loading them again."""
    engine, prompt, _ = demoted_engine(make_engine, encode)
    second = prompt + encode(" and then")
    outs = run(engine, {"b": second, "c": second}, GREEDY)
    assert tokens_of(outs["b"]) == tokens_of(outs["c"]) == hf_greedy(second, N)
    assert final(outs["b"]).usage.cached_tokens_by_tier == {"cpu": 32}
    assert final(outs["c"]).usage.cached_tokens_by_tier == {"device": 32}
    assert engine.stats().prefix_hits["cpu"] == 2


def test_a_step_that_fails_leaves_no_unchecked_page_cached(make_engine, encode):
    """If waiting for a load's checks raises, or the step itself does, the batch fails alone
    (BatchFailed, its requests aborted), the loaded pages are not left in the prefix cache and
    the load's host memory is let go."""
    engine, prompt, keys = demoted_engine(make_engine, encode)
    host = engine.offload.host
    corrupt = bytearray(host.get_many([keys[1]])[0])
    corrupt[-3] ^= 0x40
    host.delete_many([keys[1]])
    host.put_many([(keys[1], bytes(corrupt))])

    def failing_drop(*args):
        raise RuntimeError("tier gone")

    engine.offload._drop_bad = failing_drop
    engine.add_request("b", prompt + encode(" and then"), GREEDY)
    with pytest.raises(BatchFailed, match="tier gone") as failed:  # only its batch fails
        engine.step()
    assert failed.value.request_ids == ["b"] and not engine.has_unfinished_requests()
    engine.step()
    assert engine.block_manager.match_prefix(keys, [prompt[:16], prompt[16:32]]) == []
    waited = []
    wait_parts = engine.offload._wait_parts
    engine.offload._wait_parts = lambda parts: waited.append(len(parts)) or wait_parts(parts)
    execute = engine.runner.execute

    def failing_execute(batch):
        raise RuntimeError("device lost")

    engine.runner.execute = failing_execute
    engine.add_request("c", prompt + encode(" and so"), GREEDY)
    with pytest.raises(BatchFailed, match="device lost"):
        engine.step()
    assert waited == [1]  # waited for, and let go, before the error went up
    engine.runner.execute = execute
    assert not engine.has_unfinished_requests()  # the engine aborted the failed batch
    engine.step()
    assert engine.block_manager.match_prefix(keys, [prompt[:16], prompt[16:32]]) == []
    assert engine.stats().num_pages_free == engine.stats().num_pages_total
