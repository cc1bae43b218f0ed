"""A tiny random Llama against transformers' generate on the same weights: llama3 RoPE, GQA,
untied head; once through the torch reference attention, once through the Triton kernels (the
CUDA path's ops) under TRITON_INTERPRET=1 in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from tiny_llama import (
    HF_CONFIG,
    NEW,
    PROMPTS,
    WINDOW_NEW,
    WINDOW_PROMPTS,
    build,
    engine_greedy,
    hf_greedy,
    windowed_greedy,
)

from kvmesh.workers.models.llama import LlamaConfig, rope_inv_freq


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = HFConfig(**HF_CONFIG)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    got = rope_inv_freq(LlamaConfig.from_hf(hf_config))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_torch_backend_matches_transformers():
    hf, loaded = build()
    assert engine_greedy(loaded, "torch") == [hf_greedy(hf, p, NEW) for p in PROMPTS]


def test_continued_windows_match_transformers_at_every_page_offset():
    """Windows of 3-5 steps over 4-token pages, each queued before the last step of the one
    before is read: a page reserved one token short, or a first slot not recomputed from the
    grown table, changes tokens here; nothing schedules while a window is queued."""
    hf, loaded = build()
    expected = [hf_greedy(hf, p, WINDOW_NEW) for p in WINDOW_PROMPTS]
    for decode_steps in (3, 4, 5):
        tokens, continued, early_schedules, _ = windowed_greedy(loaded, decode_steps)
        assert tokens == expected, decode_steps
        assert continued >= WINDOW_NEW // decode_steps - 2 and early_schedules == 0


def test_triton_kernels_match_transformers_under_the_interpreter():
    script = os.path.join(os.path.dirname(__file__), "tiny_llama.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-P", script, "triton"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["engine"] == result["hf"]
