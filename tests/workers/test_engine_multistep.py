"""Multi-step greedy decode (windows of steps queued at once, tokens fed back on the device) on
the real SmolLM2 in fp32 on CPU: token-identical to transformers, exact stops mid-window, no step
past max_tokens in the output (the fallback under a tiny page pool is in test_engine_greedy's
preemption test)."""

from __future__ import annotations

import pytest
from engine_helpers import LONG, PROMPTS, final, run, tokens_of

from kvmesh.workers.engine.sampling_params import SamplingParams

STEPS = 4


def test_batched_multistep_matches_transformers_with_uneven_lengths(make_engine, encode,
                                                                    hf_greedy):
    engine = make_engine(decode_steps=STEPS)
    assert engine.decode_steps == STEPS
    prompts = {f"r{i}": encode(p) for i, p in enumerate(PROMPTS)}
    lengths = {"r0": 5, "r1": 14, "r2": 9}  # none a multiple of the window
    outs = {}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=lengths[rid],
                                                    ignore_eos=True))
    num_steps = 0
    while engine.has_unfinished_requests():
        num_steps += 1
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    for rid, ids in prompts.items():
        assert tokens_of(outs[rid]) == hf_greedy(ids, lengths[rid])
        last = final(outs[rid])
        assert last.finish_reason == "length"
        assert last.usage.completion_tokens == lengths[rid]
    # a prefill step, then windows of up to STEPS tokens: far fewer steps than tokens
    assert num_steps <= 1 + -(-14 // STEPS) + 2
    stats = engine.stats()
    assert stats.num_pages_free == stats.num_pages_total


@pytest.mark.parametrize("continue_windows", [False, True])
@pytest.mark.parametrize("stop_at", [6, 8])  # inside the second window; its last step
def test_stop_token_inside_a_window_ends_exactly_there(make_engine, encode, continue_windows,
                                                       stop_at):
    prompt = encode(LONG)
    full = tokens_of(run(make_engine(decode_steps=1), {"a": prompt},
                         SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))["a"])
    stop_id = full[stop_at]
    assert stop_id not in full[:stop_at]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            stop_token_ids=[stop_id])
    engine = make_engine(decode_steps=STEPS)
    engine.scheduler.continue_windows = continue_windows
    outs = run(engine, {"a": prompt}, params)["a"]
    assert tokens_of(outs) == full[: stop_at + 1]
    assert engine.queued_window is None  # the window queued past the stop was drained
    assert final(outs).finish_reason == "stop"
    assert final(outs).usage.completion_tokens == stop_at + 1
    assert engine.stats().num_pages_free == engine.stats().num_pages_total


def test_prefix_after_a_multistep_run_is_reused(make_engine, encode, hf_greedy):
    """Pages filled during a window are registered only up to the kept tokens; a follow-up
    request reuses exactly those."""
    engine = make_engine(decode_steps=STEPS)
    first = encode(LONG)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    answer = tokens_of(run(engine, {"a": first}, params)["a"])
    second = first + answer + encode(" Then")
    outs = run(engine, {"b": second}, params)["b"]
    assert tokens_of(outs) == hf_greedy(second, 16)
    computed = len(first) + 16 - 1
    assert final(outs).usage.cached_tokens == 16 * (computed // 16)


def test_sampled_requests_take_single_steps(make_engine, encode):
    assert make_engine().decode_steps == 1  # the default without CUDA graphs
    engine = make_engine(decode_steps=STEPS)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    outs = run(engine, {"s": encode(PROMPTS[0])}, params)["s"]
    assert all(len(o.new_token_ids) == 1 for o in outs)
    assert tokens_of(outs) == tokens_of(run(make_engine(), {"s": encode(PROMPTS[0])},
                                            params)["s"])


def _count_calls(obj, name: str) -> list[int]:
    calls = [0]
    method = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return method(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def test_windows_continue_without_scheduling(make_engine, encode, hf_greedy):
    """The next window is queued before the host reads the last step of the one before: one
    schedule for the whole decode, the same tokens."""
    engine = make_engine(decode_steps=STEPS)
    engine.scheduler.continue_windows = True  # on by default only with CUDA graphs
    continued = _count_calls(engine.runner, "continue_decode_steps")
    schedules = _count_calls(engine.scheduler, "schedule")
    prompt = encode(PROMPTS[1])
    outs = run(engine, {"a": prompt}, SamplingParams(temperature=0.0, max_tokens=14,
                                                     ignore_eos=True))["a"]
    assert tokens_of(outs) == hf_greedy(prompt, 14)
    # prefill (token 1), then windows of 4, 4, 4 and 1 tokens: the last three continued
    assert [len(o.new_token_ids) for o in outs] == [1, 4, 4, 4, 1]
    assert continued[0] == 3 and schedules[0] == 2
    assert engine.stats().num_pages_free == engine.stats().num_pages_total


def test_arrival_and_abort_while_steps_are_queued(make_engine, encode, hf_greedy):
    """A request that arrives, or an abort, while a continued window is queued: step() takes
    that window's tokens first, then schedules; nothing is lost or freed early."""
    engine = make_engine(decode_steps=STEPS)
    engine.scheduler.continue_windows = True
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    a, b, c = (encode(p) for p in PROMPTS)
    engine.add_request("a", a, params)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request("c", c, long)
    outs: dict[str, list] = {"a": [], "b": [], "c": []}

    def step():
        for out in engine.step():
            outs[out.request_id].append(out)

    step()  # prefill
    step()  # first window; the second is queued behind it
    assert engine.queued_window is not None
    engine.add_request("b", b, params)
    step()  # the queued window, then b's prefill
    assert len(tokens_of(outs["b"])) == 1
    while engine.queued_window is None:
        step()
    assert not outs["c"][-1].finish_reason
    engine.abort_request("c")
    while engine.has_unfinished_requests():
        step()
    assert tokens_of(outs["a"]) == hf_greedy(a, 14)
    assert tokens_of(outs["b"]) == hf_greedy(b, 14)
    got_c = tokens_of(outs["c"])
    assert 0 < len(got_c) < 40 and got_c == hf_greedy(c, 40)[: len(got_c)]
    assert final(outs["c"]).finish_reason == "abort"
    assert engine.stats().num_pages_free == engine.stats().num_pages_total
