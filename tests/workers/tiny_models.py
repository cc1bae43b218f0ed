"""A tiny random Llama (GQA, llama3 RoPE scaling, untied head) and greedy references from
transformers on the same weights. Run as a script (`python tiny_llama.py BACKEND`) it prints the
engine's and transformers' tokens as JSON: the Triton test runs it with TRITON_INTERPRET=1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.engine import Engine
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.models.llama import LlamaConfig
from kvmesh.workers.models.loader import LoadedModel

HF_CONFIG = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 16})
PROMPTS = [[(7 * i + 3) % 211 for i in range(n)] for n in (5, 37, 70)]
NEW = 20


def build():
    """(transformers model, LoadedModel sharing its weights)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(**HF_CONFIG)).float().eval()
    with torch.no_grad():  # larger weights than the init: sharper logits, no argmax near-ties
        for p in hf.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    loaded = LoadedModel("tiny", LlamaConfig.from_hf(hf.config), hf.state_dict(), None,
                         "tiny-seed0", "none", Path("."))
    return hf, loaded


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def engine_greedy(loaded: LoadedModel, backend: str) -> list[list[int]]:
    config = WorkerConfig(model="tiny", kv_cache_bytes=1 << 20, max_num_batched_tokens=24,
                          attention_backend=backend, page_size=8)
    engine = Engine(config, loaded=loaded)
    return engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=NEW,
                                                   ignore_eos=True))


# five prompts of 5-9 tokens over 4-token pages: windows of 3, 4 or 5 steps end at every offset
# within a page, some of them on a page's last slot
WINDOW_PROMPTS = [[(7 * i + 3 + j) % 211 for i in range(n)] for j, n in enumerate(range(5, 10))]
WINDOW_NEW = 25


def windowed_greedy(loaded: LoadedModel, decode_steps: int, device: str = "cpu",
                    ) -> tuple[list[list[int]], int, int, bool]:
    """Greedy tokens of WINDOW_PROMPTS decoded in continued windows of decode_steps (4-token
    pages), the number of windows continued, of schedules while a window was queued, and
    whether the steps ran as CUDA graphs."""
    config = WorkerConfig(model="tiny", device=device, dtype="float32", page_size=4,
                          kv_cache_bytes=8 << 20, max_model_len=128, decode_steps=decode_steps)
    engine = Engine(config, loaded=loaded)
    engine.scheduler.continue_windows = True
    counts = {"continued": 0, "early_schedules": 0}
    continue_steps, schedule = engine.runner.continue_decode_steps, engine.scheduler.schedule

    def counted_continue(*args):
        counts["continued"] += 1
        return continue_steps(*args)

    def checked_schedule():
        counts["early_schedules"] += engine.queued_window is not None
        return schedule()

    engine.runner.continue_decode_steps = counted_continue
    engine.scheduler.schedule = checked_schedule
    tokens = engine.generate(WINDOW_PROMPTS, SamplingParams(temperature=0.0, max_tokens=WINDOW_NEW,
                                                            ignore_eos=True))
    assert engine.stats().num_pages_free == engine.stats().num_pages_total
    engine.close()
    return tokens, counts["continued"], counts["early_schedules"], engine.runner.graphs is not None


if __name__ == "__main__":
    torch.set_num_threads(1)
    hf_model, tiny = build()
    print(json.dumps({"engine": engine_greedy(tiny, sys.argv[1]),
                      "hf": [hf_greedy(hf_model, p, NEW) for p in PROMPTS]}))
