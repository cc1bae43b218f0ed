"""Model loading: the GGUF is converted once into a cached Hugging Face folder; folders load
directly; bad paths fail with ModelLoadError."""

from __future__ import annotations

import pytest
import torch

from kvmesh.workers.errors import ModelLoadError
from kvmesh.workers.models.loader import cache_root, hf_folder_for, load_model


def test_gguf_conversion_is_cached_and_reused(smollm2):
    folder, model_id, fingerprint = hf_folder_for("smollm2")
    assert folder == smollm2.folder and folder.parent == cache_root() / "models"
    assert model_id == "SmolLM2-135M-Instruct.Q4_1" and fingerprint == folder.name
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert hf_folder_for("smollm2")[0] == folder
    assert weights.stat().st_mtime_ns == before  # not converted again


def test_a_hugging_face_folder_loads_the_same_weights(smollm2):
    again = load_model(str(smollm2.folder))
    assert again.config == smollm2.config
    assert again.state_dict.keys() == smollm2.state_dict.keys()
    name = "model.layers.3.self_attn.k_proj.weight"
    assert torch.equal(again.state_dict[name], smollm2.state_dict[name])
    assert again.tokenizer_fingerprint == smollm2.tokenizer_fingerprint
    assert len(again.weights_fingerprint) == 32
    assert smollm2.config.num_layers == 30 and smollm2.config.num_kv_heads == 3


def test_bad_model_paths_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    text = tmp_path / "weights.txt"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match="neither a folder nor a .gguf"):
        load_model(str(text))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(tmp_path))
