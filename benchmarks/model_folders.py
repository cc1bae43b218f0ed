"""Random-weight Hugging Face model folders with real model shapes, for benchmarks on a machine
without the hub: `make_folder("llama-1b", DIR, tokenizer_dir=...)` writes config.json,
model.safetensors (bf16, seeded) and the tokenizer files of `tokenizer_dir` (e.g. SmolLM2's,
vocab 49,152; the shapes' vocabulary is set to the tokenizer's), so `kvmesh serve --model DIR`
and `kvmesh worker --model DIR` load it as a user's folder.

    python benchmarks/model_folders.py llama-1b /tmp/llama-1b --tokenizer-dir TOKDIR
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# (transformers config class, model class, shape); vocab sizes are the models' own
SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE)),
    "llama-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-tiny": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=1000, tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE)),
}


def build_model(shape: str, device: str, dtype: Any, max_len: int,
                vocab_size: int | None = None) -> Any:
    """The transformers model of `shape`, random (seed 0), built straight in `dtype` on
    `device`."""
    import torch
    import transformers

    config_name, model_name, fields = SHAPES[shape]
    fields = {**fields, **({"vocab_size": vocab_size} if vocab_size else {})}
    config = getattr(transformers, config_name)(
        **fields, max_position_embeddings=max_len, rms_norm_eps=1e-5, bos_token_id=0,
        eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of 8B weights on the way
    try:
        with torch.device(device):
            return getattr(transformers, model_name)(config).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)


def make_folder(shape: str, out: Path, tokenizer_dir: Path, max_len: int = 16384) -> Path:
    """Write the folder (bf16 weights) unless it is there already; returns `out`."""
    import torch

    if (out / "config.json").exists():
        return out
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer["added_tokens"])]
    vocab = max(ids) + 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(shape, device, torch.bfloat16, max_len, vocab_size=vocab)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for path in tokenizer_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name == "chat_template.jinja":
            shutil.copy(path, out / path.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer-dir", type=Path, required=True,
                    help="folder with tokenizer.json (e.g. SmolLM2's, converted by kvmesh)")
    ap.add_argument("--max-len", type=int, default=16384)
    args = ap.parse_args()
    print(make_folder(args.shape, args.out, args.tokenizer_dir, args.max_len))


if __name__ == "__main__":
    main()
