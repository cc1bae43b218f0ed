"""A tiny random model of each family against transformers' generate on the same weights
(Llama: llama3 RoPE, GQA, untied head; Qwen2 with q/k/v bias, tied and untied; Qwen3 with q/k
norm and an explicit head_dim; Mistral without a window, and with sliding windows of 24 and 7
on every layer; Qwen2 and Qwen3 with windows of 6 and 10 on their last two layers): through
the torch reference attention, in continued multi-step windows, and through the Triton kernels
(the CUDA path's ops: skinny matmuls, fused norms, RoPE fused into the cache write) under
TRITON_INTERPRET=1 in one subprocess for every family. transformers' own output changes with
each window (and with the window one longer or shorter), so matching it checks the window
exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import (
    FAMILIES,
    HF_CONFIG,
    NEW,
    PROMPTS,
    WINDOW_NEW,
    WINDOW_PROMPTS,
    WINDOWS_OFF,
    build,
    engine_greedy,
    family_of,
    hf_greedy,
    hf_model,
    triton_prompts,
    windowed_greedy,
)

from kvmesh.workers.models.registry import config_from_hf
from kvmesh.workers.models.rotary import rope_inv_freq


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = HFConfig(**HF_CONFIG)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    got = rope_inv_freq(config_from_hf(hf_config))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", WINDOWS_OFF)
def test_each_window_changes_transformers_output(family):
    """The windowed families' references differ from the same weights without the window and
    with a window one key longer or shorter, on the prompts of the torch and the Triton runs:
    the comparisons below test the window, exactly."""
    window = FAMILIES[family][1]["sliding_window"]
    for prompts, new in ((PROMPTS, NEW), triton_prompts(family)):
        expected = [hf_greedy(hf_model(family), p, new) for p in prompts]
        for overrides in (WINDOWS_OFF[family], {"sliding_window": window - 1},
                          {"sliding_window": window + 1}):
            got = [hf_greedy(hf_model(family, **overrides), p, new) for p in prompts]
            assert got != expected, (new, overrides)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_backend_matches_transformers(family):
    hf, loaded = build(family)
    assert loaded.config.family == family_of(family)
    assert engine_greedy(loaded, "torch") == [hf_greedy(hf, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_continued_windows_match_transformers_at_every_page_offset(family):
    """Windows of 3-5 steps over 4-token pages, each queued before the last step of the one
    before is read: a page reserved one token short, or a first slot not recomputed from the
    grown table, changes tokens here; nothing schedules while a window is queued."""
    hf, loaded = build(family)
    expected = [hf_greedy(hf, p, WINDOW_NEW) for p in WINDOW_PROMPTS]
    for decode_steps in (3, 4, 5):
        tokens, continued, early_schedules, _ = windowed_greedy(loaded, decode_steps)
        assert tokens == expected, decode_steps
        assert continued >= WINDOW_NEW // decode_steps - 2 and early_schedules == 0


def test_triton_kernels_match_transformers_under_the_interpreter():
    script = os.path.join(os.path.dirname(__file__), "tiny_models.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-P", script], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(FAMILIES)
    for family, result in results.items():
        assert result["engine"] == result["hf"], family
