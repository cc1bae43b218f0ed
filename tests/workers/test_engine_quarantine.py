"""One request that raises inside the engine step fails alone: the engine quarantines it (aborts
it, frees its pages) and the others in the same batch go on with exact tokens. Faults are
injected into the real engine on the real SmolLM2."""

from __future__ import annotations

import pytest
from engine_helpers import PROMPTS, final, run, tokens_of

from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.errors import BatchFailed
from kvmesh.workers.runner import sampler

N = 6


def _greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, **kwargs)


def _drain(engine) -> dict[str, list]:
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_a_row_whose_sampling_raises_fails_alone(make_engine, encode, hf_greedy, monkeypatch):
    engine = make_engine()
    free = engine.stats().num_pages_free
    seeded = SamplingParams(temperature=0.8, seed=11, max_tokens=N, ignore_eos=True)
    alone = tokens_of(run(engine, {"s": encode(PROMPTS[2])}, seeded)["s"])
    poison = SamplingParams(temperature=0.8, max_tokens=N, ignore_eos=True)
    draw = sampler._draw

    def faulty(logits, params, gen):
        if params is poison:
            raise RuntimeError("injected sampling fault")
        return draw(logits, params, gen)

    monkeypatch.setattr(sampler, "_draw", faulty)
    engine.add_request("good", encode(PROMPTS[0]), _greedy())
    engine.add_request("poison", encode(PROMPTS[1]), poison)
    engine.add_request("seeded", encode(PROMPTS[2]), seeded)
    outs = _drain(engine)
    (failed,) = outs["poison"]
    assert failed.finish_reason == "error" and failed.new_token_ids == []
    assert "RuntimeError: injected sampling fault" in failed.error
    assert tokens_of(outs["good"]) == hf_greedy(encode(PROMPTS[0]), N)
    assert final(outs["good"]).finish_reason == "length" and final(outs["good"]).error is None
    assert tokens_of(outs["seeded"]) == alone  # its generator was not disturbed
    assert engine.stats().num_pages_free == free
    assert engine.stats().num_running == engine.stats().num_waiting == 0


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_a_request_whose_postprocessing_raises_mid_stream_fails_alone(
        make_engine, encode, hf_greedy, decode_steps):
    engine = make_engine(decode_steps=decode_steps)
    free = engine.stats().num_pages_free
    append = engine._append

    def faulty(seq, token):  # the 3rd token of either completion of "poison" raises
        if seq.request_id == "poison" and seq.num_output_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return append(seq, token)

    engine._append = faulty
    engine.add_request("good", encode(PROMPTS[0]), _greedy())
    engine.add_request("poison", encode(PROMPTS[1]), _greedy(n=2))
    outs = _drain(engine)
    expected = hf_greedy(encode(PROMPTS[1]), N)
    errors = [o for o in outs["poison"] if o.finish_reason is not None]
    assert sorted(o.index for o in errors) == [0, 1]
    assert all(o.finish_reason == "error" and "injected" in o.error for o in errors)
    for index in (0, 1):  # what went out before the fault is the right prefix
        assert tokens_of(outs["poison"], index) == expected[:2]
    assert tokens_of(outs["good"]) == hf_greedy(encode(PROMPTS[0]), N)
    assert final(outs["good"]).finish_reason == "length"
    assert engine.stats().num_pages_free == free


def test_a_failed_model_run_fails_its_batch_and_the_engine_goes_on(make_engine, encode,
                                                                     hf_greedy, monkeypatch):
    engine = make_engine(max_num_seqs=1)  # "b" waits while "a" runs
    free = engine.stats().num_pages_free
    execute = engine.runner.execute
    calls = []

    def faulty(batch):
        calls.append([seq.request_id for seq in batch.seqs])
        if len(calls) == 2:
            raise RuntimeError("injected device fault")
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", faulty)
    engine.add_request("a", encode(PROMPTS[0]), _greedy())
    engine.add_request("b", encode(PROMPTS[1]), _greedy())
    (first,) = engine.step()
    assert first.request_id == "a" and len(first.new_token_ids) == 1
    with pytest.raises(BatchFailed, match="injected device fault") as info:
        engine.step()
    assert info.value.request_ids == ["a"]
    outs = _drain(engine)
    assert set(outs) == {"b"}
    assert tokens_of(outs["b"]) == hf_greedy(encode(PROMPTS[1]), N)
    assert engine.stats().num_pages_free == free
