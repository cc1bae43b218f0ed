"""Sampler and SamplingParams on fixed logits."""

from __future__ import annotations

import pytest
import torch

from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.errors import InvalidRequest
from kvmesh.workers.runner.sampler import (
    SamplingError,
    filter_logits,
    make_generator,
    sample,
    sample_each,
)


def logits(num_rows: int = 3, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_take_the_argmax():
    x = logits()
    expected = x.argmax(-1).tolist()
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=1)):
        assert sample(x, [params] * 3, [None] * 3) == expected


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    x = logits(num_rows=1, vocab=1000)
    params = SamplingParams(temperature=1.5, seed=1234)

    def draw(p: SamplingParams, index: int = 0) -> list[int]:
        gen = make_generator(p, index)
        return [sample(x, [p], [gen])[0] for _ in range(20)]

    first = draw(params)
    assert first == draw(params)
    assert first != draw(SamplingParams(temperature=1.5, seed=1235))
    assert first != draw(params, index=1)  # the n completions of one request differ
    assert len(set(first)) > 5  # high temperature over 1000 tokens really samples


def test_top_k_keeps_exactly_k_tokens():
    x = logits(num_rows=1)[0]
    kept = torch.isfinite(filter_logits(x, SamplingParams(top_k=5)))
    assert kept.sum().item() == 5
    assert set(kept.nonzero().flatten().tolist()) == set(torch.topk(x, 5).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = torch.isfinite(filter_logits(x, SamplingParams(top_p=0.7))).tolist()
    assert kept == [True, True, False, False, False]
    kept = torch.isfinite(filter_logits(x, SamplingParams(top_p=0.71))).tolist()
    assert kept == [True, True, True, False, False]
    kept = torch.isfinite(filter_logits(x, SamplingParams(top_p=0.3))).tolist()
    assert kept == [True, False, False, False, False]


def test_sampling_only_draws_allowed_tokens():
    x = logits(num_rows=1, vocab=50)
    params = SamplingParams(temperature=20.0, top_k=3, seed=7)  # near-uniform over 3
    gen = make_generator(params, 0)
    allowed = set(torch.topk(x[0], 3).indices.tolist())
    assert {sample(x, [params], [gen])[0] for _ in range(50)} == allowed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_tokens": 0},
        {"n": 0},
        {"n": 100},
        {"stop": [""]},
        {"seed": -1},
        {"stop_token_ids": [-3]},
    ],
)
def test_bad_params_raise_invalid_request(kwargs):
    with pytest.raises(InvalidRequest):
        SamplingParams(**kwargs)


def test_stop_token_outside_vocab_is_rejected_on_validate():
    params = SamplingParams(stop_token_ids=[50])
    params.validate(vocab_size=100)
    with pytest.raises(InvalidRequest, match="stop token id 50"):
        params.validate(vocab_size=50)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 9e-6])
def test_temperature_below_the_floor_samples_greedily(temperature):
    # logits / 1e-40 overflow fp32 to inf and softmax gives NaN; the floor makes these greedy
    params = SamplingParams(temperature=temperature)
    assert params.is_greedy
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 30
    assert sample(x, [params] * 3, [None] * 3) == x.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"top_p": float("-inf")}, "top_p must be a finite number"),
        ({"temperature": "1"}, "temperature must be a number"),
        ({"stop_token_ids": [1] * 257}, "stop_token_ids holds 257 ids; at most 256"),
    ],
)
def test_non_finite_and_oversized_params_are_rejected(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


def test_top_k_past_the_vocabulary_keeps_every_token():
    x = torch.randn(1, 20, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, top_k=2**31 - 1)
    assert torch.equal(filter_logits(x[0], params), x[0])


def test_a_row_without_a_finite_distribution_fails_alone():
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    x[1] = float("nan")  # what a broken row would give; only row 1 may fail
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7),
              SamplingParams(temperature=0.7, seed=5)]
    gens = [None, make_generator(params[1], 0), make_generator(params[2], 0)]
    got = sample_each(x, params, gens)
    assert got[0] == int(x[0].argmax())
    assert isinstance(got[1], SamplingError) and "no finite distribution" in str(got[1])
    (expected,) = sample(x[2:], params[2:], [make_generator(params[2], 0)])
    assert got[2] == expected
    with pytest.raises(SamplingError):
        sample(x, params, [None, make_generator(params[1], 0), None])
