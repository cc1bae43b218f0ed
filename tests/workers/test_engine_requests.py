"""Request handling on the real SmolLM2: stop conditions, abort, bad requests, KV events,
tenant isolation."""

from __future__ import annotations

import pytest
from engine_helpers import LONG, final, run, tokens_of

from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.errors import InvalidRequest

N = 16
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


def test_stop_token_ids_end_the_completion(engine, encode, hf_greedy):
    prompt = encode(PROMPT)
    ref = hf_greedy(prompt, N)
    k = 5
    stop_id = ref[k]
    first = ref.index(stop_id)
    params = SamplingParams(temperature=0.0, max_tokens=N, stop_token_ids=[stop_id])
    outs = run(engine, {"a": prompt}, params)["a"]
    assert tokens_of(outs) == ref[: first + 1]
    assert final(outs).finish_reason == "stop"
    assert final(outs).usage.completion_tokens == first + 1


def test_stop_string_is_cut_from_the_text(engine, encode, hf_greedy, smollm2):
    prompt = encode(PROMPT)
    ref = hf_greedy(prompt, N)
    text = smollm2.tokenizer.decode(ref, skip_special_tokens=True)
    words = text.split()
    stop = words[len(words) // 2]
    cut = text.index(stop)
    params = SamplingParams(temperature=0.0, max_tokens=N, stop=[stop, "never appears"])
    outs = run(engine, {"a": prompt}, params)["a"]
    assert "".join(o.text_delta for o in outs) == text[:cut]
    assert final(outs).finish_reason == "stop"
    got = tokens_of(outs)
    assert got == ref[: len(got)] and len(got) < N
    # the stop string was completed by the last token, not earlier
    assert stop in smollm2.tokenizer.decode(got) and stop not in smollm2.tokenizer.decode(got[:-1])


def test_text_deltas_add_up_to_the_decoded_tokens(engine, encode, smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    outs = run(engine, {"a": encode("Write a haiku about snow:")}, params)["a"]
    text = "".join(o.text_delta for o in outs)
    assert text == smollm2.tokenizer.decode(tokens_of(outs), skip_special_tokens=True)
    assert final(outs).finish_reason == "length" and len(tokens_of(outs)) == N


def test_eos_stops_unless_ignore_eos(engine, smollm2):
    chat = [{"role": "user", "content": "Reply with one word: hello"}]
    prompt = smollm2.tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
    eos = smollm2.config.eos_token_ids[0]
    stopped = run(engine, {"a": list(prompt)}, SamplingParams(temperature=0.0, max_tokens=40))
    got = tokens_of(stopped["a"])
    assert got[-1] == eos and eos not in got[:-1] and len(got) < 40
    assert final(stopped["a"]).finish_reason == "stop"
    params = SamplingParams(temperature=0.0, max_tokens=len(got) + 3, ignore_eos=True)
    going = run(engine, {"b": list(prompt)}, params)["b"]
    assert tokens_of(going)[: len(got)] == got
    assert len(tokens_of(going)) == len(got) + 3 and final(going).finish_reason == "length"


def test_abort_frees_pages_and_reports_usage(engine, encode):
    total = engine.stats().num_pages_total
    params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    engine.add_request("x", encode(LONG), params)
    engine.add_request("queued", encode(PROMPT), params)
    got = []
    while len(got) < 3:
        got += [t for o in engine.step() if o.request_id == "x" for t in o.new_token_ids]
    assert engine.stats().num_pages_free < total
    engine.abort_request("x")
    engine.abort_request("never-existed")
    outs = engine.step()
    (aborted,) = [o for o in outs if o.request_id == "x"]
    assert aborted.finish_reason == "abort" and aborted.new_token_ids == []
    assert aborted.usage.completion_tokens == len(got)
    engine.abort_request("queued")
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.stats()
    assert stats.num_pages_free == total and stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "empty"),
        ([1, 2, -1], "token ids"),
        ([1, 49152], "token ids"),
        ([1, 2.0], "token ids"),
        ([1, True], "token ids"),  # a JSON true is not a token id
        ([7] * 512, "at most 511"),
    ],
)
def test_bad_requests_raise_and_queue_nothing(engine, prompt, match):
    with pytest.raises(InvalidRequest, match=match):
        engine.add_request("bad", prompt, SamplingParams())
    assert not engine.has_unfinished_requests()


def test_duplicate_id_and_bad_params(engine):
    params = SamplingParams(max_tokens=1)
    engine.add_request("dup", [1, 2, 3], params)
    with pytest.raises(InvalidRequest, match="duplicate"):
        engine.add_request("dup", [1, 2, 3], params)
    with pytest.raises(InvalidRequest, match="stop token id"):
        engine.add_request("big", [1], SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(InvalidRequest, match="request_id"):
        engine.add_request("", [1], params)
    engine.abort_request("dup")
    while engine.has_unfinished_requests():
        engine.step()


def test_request_larger_than_the_pool_is_rejected(make_engine):
    page_nbytes = 30 * 2 * 16 * 3 * 64 * 4
    small = make_engine(kv_cache_bytes=4 * page_nbytes)
    with pytest.raises(InvalidRequest, match="do not fit the KV cache"):
        small.add_request("r", [5] * 60, SamplingParams(max_tokens=10))


def test_kv_events_and_snapshot_list_the_chained_pages(make_engine, encode):
    engine = make_engine()
    prompt = encode(LONG)
    params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    out = tokens_of(run(engine, {"a": prompt}, params)["a"])
    computed = (prompt + out)[: len(prompt) + N - 1]
    keys = engine.namespace().page_keys(computed)
    events = engine.pop_kv_events()
    stored = [e for e in events if e.kind == "stored" and e.tier == "device"]
    assert [k for e in stored for k in e.keys] == keys
    assert stored[0].parent is None
    assert engine.pop_kv_events() == []
    snapshot = engine.cached_pages()
    assert [e.keys[0] for e in snapshot] == keys
    assert [e.parent for e in snapshot] == [None] + keys[:-1]


def test_tenants_do_not_share_pages(make_engine, encode):
    engine = make_engine()
    prompt = encode(LONG)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    engine.add_request("t1", prompt, params, tenant_salt="tenant-1")
    engine.add_request("t1b", prompt, SamplingParams(temperature=0.0, max_tokens=1),
                       tenant_salt="tenant-1")
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finish_reason:
                outs[o.request_id] = o
    # same tenant, same step: duplicate compute is fine, no false sharing
    engine.add_request("t2", prompt, params, tenant_salt="tenant-2")
    engine.add_request("t1c", prompt, params, tenant_salt="tenant-1")
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finish_reason:
                outs[o.request_id] = o
    assert outs["t2"].usage.cached_tokens == 0
    assert outs["t1c"].usage.cached_tokens == 16 * ((len(prompt) - 1) // 16)
    assert engine.namespace("tenant-1").digest != engine.namespace("tenant-2").digest
