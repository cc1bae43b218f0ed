"""The family registry and what it refuses: transformers' architectures (or model_type) pick
the definition; an unsupported architecture, and every config feature no definition
implements, is a ModelLoadError that says what is wrong (never an approximation), at load time
and before any weight is read. Real transformers configs and saved folders throughout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from tiny_models import FAMILIES, build, hf_model, save_folder

from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.engine import Engine
from kvmesh.workers.errors import InvalidConfig, ModelLoadError
from kvmesh.workers.models.llama import LlamaForCausalLM
from kvmesh.workers.models.loader import load_model
from kvmesh.workers.models.mistral import MistralForCausalLM
from kvmesh.workers.models.qwen2 import Qwen2ForCausalLM
from kvmesh.workers.models.qwen3 import Qwen3ForCausalLM
from kvmesh.workers.models.registry import config_from_hf, model_class_for

SUPPORTED = ("LlamaForCausalLM (llama), MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2), "
             "Qwen3ForCausalLM (qwen3)")


def hf_config(family: str, **overrides):
    arch, kwargs = FAMILIES[family]
    config_cls = getattr(transformers, arch).config_class
    return config_cls(**{**kwargs, "architectures": [arch], **overrides})


@pytest.mark.parametrize(("family", "cls"), [("llama", LlamaForCausalLM),
                                             ("qwen2-tied", Qwen2ForCausalLM),
                                             ("qwen3", Qwen3ForCausalLM),
                                             ("mistral", MistralForCausalLM)])
def test_architectures_and_model_types_pick_the_family(family, cls):
    assert model_class_for(hf_config(family)) is cls
    assert model_class_for(hf_config(family, architectures=None)) is cls  # by model_type
    cfg = config_from_hf(hf_config(family))
    assert cfg.family == cls.family
    assert cfg.qkv_bias == (cls is Qwen2ForCausalLM) and cfg.qk_norm == (cls is Qwen3ForCausalLM)


def test_qwen3_takes_its_explicit_head_dim():
    cfg = config_from_hf(hf_config("qwen3"))
    assert cfg.head_dim == 32 and cfg.hidden_size // cfg.num_heads == 8


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path))
    assert str(err.value) == ("unsupported architecture GPT2LMHeadModel; "
                              f"kvmesh supports {SUPPORTED}")
    with pytest.raises(ModelLoadError, match="unsupported model_type 'qwen2_moe'; kvmesh supp"):
        config_from_hf(transformers.Qwen2MoeConfig(num_hidden_layers=1))
    with pytest.raises(ModelLoadError, match="unsupported architecture LlamaForSequenceClass"):
        config_from_hf(hf_config("llama", architectures=["LlamaForSequenceClassification"]))


@pytest.mark.parametrize(("family", "overrides", "message"), [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope type 'yarn' \\(supported: default, llama3\\)"),
    ("qwen2", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'linear'"),
    ("llama", {"attention_bias": True}, "attention_bias=true"),
    ("llama", {"mlp_bias": True}, "mlp_bias=true"),
    ("qwen3", {"attention_bias": True}, "attention_bias=true"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("llama", {"num_local_experts": 8}, "mixture of experts \\(num_local_experts=8\\)"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
     "use_sliding_window=true"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
     "use_sliding_window=true"),
    ("mistral", {"sliding_window": 24},
     "sliding_window=24 \\(shorter than max_position_embeddings=256\\): sliding-window attention "
     "is not supported yet"),
])
def test_config_features_not_implemented_are_refused(family, overrides, message):
    with pytest.raises(ModelLoadError, match=message) as err:
        config_from_hf(hf_config(family, **overrides))
    assert "is not supported; kvmesh refuses a model it would not compute exactly" in str(err.value)


def test_a_mistral_window_as_long_as_the_context_is_full_attention():
    assert config_from_hf(hf_config("mistral", sliding_window=256)).sliding_window is None
    assert config_from_hf(hf_config("mistral", sliding_window=None)).sliding_window is None


def test_a_mistral_folder_whose_window_is_shorter_than_the_prompt_is_refused(tmp_path):
    """The issue's case: served through the Llama path it matched transformers for one token,
    then diverged. Now neither load_model nor a worker accepts it."""
    folder = save_folder(hf_model("mistral", sliding_window=24), tmp_path / "mistral-w24")
    for load in (lambda: load_model(str(folder)),
                 lambda: Engine(WorkerConfig(model=str(folder), kv_cache_bytes=1 << 20))):
        with pytest.raises(ModelLoadError, match="sliding-window attention is not supported yet"):
            load()


def test_weights_that_do_not_fit_the_config_are_refused():
    from kvmesh.workers.models.registry import model_class

    hf = hf_model("qwen2")
    cfg = config_from_hf(hf_config("qwen3"))  # q/k norm weights missing, biases unexpected
    with torch.device("meta"):
        model = model_class(cfg)(cfg, max_positions=64)
    with pytest.raises(ModelLoadError, match="weights do not fit the qwen3"):
        model.load_weights(hf.state_dict(), torch.device("cpu"), torch.float32)


def test_kv_identity_covers_the_architecture_and_every_kv_field():
    base = config_from_hf(hf_config("mistral"))
    as_llama = config_from_hf(hf_config("llama", **dict(FAMILIES["mistral"][1])))
    variants = [as_llama,
                config_from_hf(hf_config("mistral", rope_parameters={"rope_type": "default",
                                                                     "rope_theta": 5e5})),
                config_from_hf(hf_config("mistral", rms_norm_eps=1e-6)),
                config_from_hf(hf_config("mistral", head_dim=32))]
    identities = {base.kv_identity()} | {v.kv_identity() for v in variants}
    assert len(identities) == 1 + len(variants)
    assert json.loads(base.kv_identity())["family"] == "mistral"
    # the EOS ids change no K/V
    assert config_from_hf(hf_config("mistral", eos_token_id=7)).fingerprint == base.fingerprint


def test_models_differing_only_in_config_never_share_a_namespace(tmp_path):
    """One safetensors file (one weights fingerprint) under one folder name, three config.json:
    Mistral, the same labelled Llama, and Mistral with another RoPE theta. Each gets its own
    namespace, so its page keys; loading a folder again keeps its namespace."""
    from kvmesh.workers.models.loader import hf_folder_for

    original = save_folder(hf_model("mistral"), tmp_path / "a" / "tiny",
                           hf_folder_for("smollm2")[0])
    edits = {"b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
             "c": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}}
    folders = [original]
    for parent, edit in edits.items():
        folder = tmp_path / parent / "tiny"
        shutil.copytree(original, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        folders.append(folder)
    loaded = [load_model(str(folder)) for folder in folders]
    assert [m.config.family for m in loaded] == ["mistral", "llama", "mistral"]
    assert len({m.weights_fingerprint for m in loaded}) == 1
    assert len({m.model_fingerprint for m in loaded}) == 3

    def namespace(model):
        engine = Engine(WorkerConfig(model="tiny", kv_cache_bytes=1 << 20), loaded=model)
        engine.close()
        return engine.namespace()

    namespaces = [namespace(m) for m in loaded]
    assert len({ns.digest for ns in namespaces}) == 3
    prompt = list(range(40))
    assert len({ns.page_keys(prompt)[0] for ns in namespaces}) == 3
    assert namespace(load_model(str(original))) == namespaces[0]


def test_a_head_dim_the_triton_kernels_cannot_take_fails_when_the_worker_starts():
    _, loaded = build("qwen3", head_dim=24)
    with pytest.raises(InvalidConfig, match="power of two >= 16; this model's is 24"):
        Engine(WorkerConfig(model="tiny", kv_cache_bytes=1 << 20, attention_backend="triton"),
               loaded=loaded)
