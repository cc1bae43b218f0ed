"""Tiny random models of every supported family (several layers, GQA, odd sizes; Mistral and
Qwen2 also with sliding windows shorter than the prompts), made with transformers, and greedy
references from transformers' `generate` on the same weights. Run as
a script (`python tiny_models.py [FAMILY...]`) it prints each family's engine (Triton kernels)
and transformers tokens as JSON: the Triton test runs it with TRITON_INTERPRET=1."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.engine import Engine
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.models.loader import LoadedModel
from kvmesh.workers.models.registry import config_from_hf

VOCAB = 211
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
HF_CONFIG = dict(_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 16})
_QWEN2 = dict(_COMMON, hidden_size=80, intermediate_size=72, num_hidden_layers=3,
              num_attention_heads=5, num_key_value_heads=1,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
_QWEN3 = dict(_COMMON, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, head_dim=32)
_MISTRAL = dict(_COMMON, hidden_size=64, intermediate_size=100, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})
# family -> (transformers architecture, its config kwargs); a family's name is our family
# (ModelConfig.family) and, after a dash, its variant

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", HF_CONFIG),  # llama3 RoPE scaling, untied head
    "qwen2": ("Qwen2ForCausalLM", _QWEN2),  # q/k/v bias, 5 heads over 1 KV head
    "qwen2-tied": ("Qwen2ForCausalLM", dict(_QWEN2, tie_word_embeddings=True)),
    # head_dim 32, not hidden / heads (8); per-head q/k norm
    "qwen3": ("Qwen3ForCausalLM", _QWEN3),
    "mistral": ("MistralForCausalLM", _MISTRAL),
    # sliding windows shorter than the prompts: Mistral's on every layer, of three 8-token
    # pages and of less than one; Qwen2's of 6 and Qwen3's of 10 on the layers from
    # max_window_layers (1) on, Qwen2 with 6 heads over 3 KV heads (the 1-KV-head Qwen2 above
    # repeats one token on long prompts, with or without windows)
    "mistral-w24": ("MistralForCausalLM", dict(_MISTRAL, sliding_window=24)),
    "mistral-w7": ("MistralForCausalLM", dict(_MISTRAL, sliding_window=7)),
    "qwen2-w6": ("Qwen2ForCausalLM", dict(_QWEN2, hidden_size=96, num_attention_heads=6,
                                          num_key_value_heads=3, use_sliding_window=True,
                                          sliding_window=6, max_window_layers=1)),
    "qwen3-w10": ("Qwen3ForCausalLM", dict(_QWEN3, use_sliding_window=True, sliding_window=10,
                                           max_window_layers=1)),
}
# the overrides that turn each windowed family's window off (same weights)
WINDOWS_OFF = {"mistral-w24": {"sliding_window": None}, "mistral-w7": {"sliding_window": None},
               "qwen2-w6": {"use_sliding_window": False},
               "qwen3-w10": {"use_sliding_window": False}}
NEW_FAMILIES = ["qwen2", "qwen2-tied", "qwen3", "mistral", *WINDOWS_OFF]
PROMPTS = [[(7 * i + 3) % VOCAB for i in range(n)] for n in (5, 37, 70)]
NEW = 20


def family_of(name: str) -> str:
    """Our family (ModelConfig.family) of a FAMILIES name ("qwen2-tied" -> "qwen2")."""
    return name.split("-")[0]


def hf_model(family: str = "llama", **overrides):
    """A random transformers model of `family` in fp32: its matrices scaled up (sharper logits,
    no argmax near-ties), its norm weights and biases random too (so loading them matters)."""
    import transformers

    arch, kwargs = FAMILIES[family]
    model_cls = getattr(transformers, arch)
    torch.manual_seed(0)
    hf = model_cls(model_cls.config_class(**{**kwargs, **overrides})).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return hf


def build(family: str = "llama", **overrides):
    """(transformers model, LoadedModel sharing its weights)."""
    hf = hf_model(family, **overrides)
    loaded = LoadedModel(f"tiny-{family}", config_from_hf(hf.config), hf.state_dict(), None,
                         f"tiny-{family}-seed0", "none", Path("."))
    return hf, loaded


def save_folder(hf, folder: Path, tokenizer_folder: Path | None = None) -> Path:
    """`hf` saved as a Hugging Face folder (safetensors), with the tokenizer files of
    tokenizer_folder if given."""
    hf.save_pretrained(folder)
    if tokenizer_folder is not None:
        for path in tokenizer_folder.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(path, folder / path.name)
    return folder


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, EOS neither stopping nor suppressed (as the engine's ignore_eos; a
    min_new_tokens would mask EOS out of the argmax)."""
    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def engine_greedy(loaded: LoadedModel, backend: str, prompts: list[list[int]] = PROMPTS,
                  new: int = NEW) -> list[list[int]]:
    config = WorkerConfig(model="tiny", kv_cache_bytes=1 << 20, max_num_batched_tokens=24,
                          attention_backend=backend, page_size=8)
    engine = Engine(config, loaded=loaded)
    return engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new,
                                                   ignore_eos=True))


def triton_prompts(family: str) -> tuple[list[list[int]], int]:
    """The prompts and number of new tokens of `triton_run`: Llama's full PROMPTS and NEW; the
    other families (under the interpreter, ~4x slower a token) two prompts (a prefill in two
    chunks, batched decodes) and 8 tokens."""
    return (PROMPTS, NEW) if family == "llama" else (PROMPTS[:2], 8)


def triton_run(family: str) -> dict[str, list[list[int]]]:
    """The engine's tokens through the Triton kernels (backend "triton") and transformers' on
    `triton_prompts`."""
    hf, loaded = build(family)
    prompts, new = triton_prompts(family)
    return {"engine": engine_greedy(loaded, "triton", prompts, new),
            "hf": [hf_greedy(hf, p, new) for p in prompts]}


# five prompts of 5-9 tokens over 4-token pages: windows of 3, 4 or 5 steps end at every offset
# within a page, some of them on a page's last slot
WINDOW_PROMPTS = [[(7 * i + 3 + j) % VOCAB for i in range(n)] for j, n in enumerate(range(5, 10))]
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
    print(json.dumps({name: triton_run(name) for name in sys.argv[1:] or FAMILIES}))
