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
from tiny_models import FAMILIES, PROMPTS, build, hf_greedy, hf_model, save_folder

from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.engine import Engine
from kvmesh.workers.engine.sampling_params import SamplingParams
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
    # per-layer patterns a family does not compute: Mistral slides every layer alike, Llama none
    ("mistral", {"sliding_window": 24, "layer_types": ["sliding_attention", "full_attention",
                                                       "sliding_attention"]},
     "layer_types \\['sliding_attention', 'full_attention', 'sliding_attention'\\] \\(the "
     "mistral definition computes the windows \\[24, 24, 24\\], None for full attention\\)"),
    ("llama", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
     "the llama definition computes the windows \\[None, None\\]"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16,
               "layer_types": ["chunked_attention", "sliding_attention", "full_attention"]},
     "layer_types \\['chunked_attention'"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16,
               "layer_types": ["full_attention", "sliding_attention", "linear_attention"]},
     "the qwen3 definition computes the windows \\[None, 16, None\\]"),
    ("mistral", {"sliding_window": 0}, "sliding_window 0"),
])
def test_config_features_not_implemented_are_refused(family, overrides, message):
    with pytest.raises(ModelLoadError, match=message) as err:
        config_from_hf(hf_config(family, **overrides))
    assert "is not supported; kvmesh refuses a model it would not compute exactly" in str(err.value)


def test_a_window_as_long_as_the_context_is_full_attention():
    for cfg in (config_from_hf(hf_config("mistral", sliding_window=256)),
                config_from_hf(hf_config("mistral", sliding_window=None)),
                config_from_hf(hf_config("qwen2", use_sliding_window=True, sliding_window=256,
                                         max_window_layers=1))):
        assert (cfg.sliding_window, cfg.full_attention_layers) == (None, ())
        assert [cfg.window_of(i) for i in range(cfg.num_layers)] == [None] * cfg.num_layers


def test_which_layers_slide():
    """Mistral: every layer; Qwen2/Qwen3: the layers transformers' layer_types marks (from
    max_window_layers on by default, or as the config lists them), none without
    use_sliding_window."""
    mistral = config_from_hf(hf_config("mistral", sliding_window=24))
    assert [mistral.window_of(i) for i in range(3)] == [24, 24, 24]
    assert mistral.attention_span(100) == 24 and mistral.attention_span(10) == 10
    qwen2 = config_from_hf(hf_config("qwen2", use_sliding_window=True, sliding_window=16,
                                     max_window_layers=1))
    assert (qwen2.sliding_window, qwen2.full_attention_layers) == (16, (0,))
    assert [qwen2.window_of(i) for i in range(3)] == [None, 16, 16]
    assert qwen2.attention_span(100) == 100  # layer 0 attends every key
    listed = config_from_hf(hf_config("qwen3", use_sliding_window=True, sliding_window=16,
                                      layer_types=["sliding_attention", "full_attention",
                                                   "sliding_attention"]))
    assert [listed.window_of(i) for i in range(3)] == [16, None, 16]
    for overrides in ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3},
                      {"use_sliding_window": False, "sliding_window": 16,
                       "max_window_layers": 1}):
        cfg = config_from_hf(hf_config("qwen2", **overrides))
        assert (cfg.sliding_window, cfg.full_attention_layers) == (None, ())


def test_use_sliding_window_without_layer_types_is_refused():
    """transformers before 5 kept no layer_types; its attention implementations applied
    Qwen2's windows differently, so kvmesh does not guess."""
    hf = hf_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    hf.layer_types = None
    with pytest.raises(ModelLoadError, match="use_sliding_window without layer_types"):
        config_from_hf(hf)


def test_a_mistral_folder_whose_window_is_shorter_than_the_prompt_is_served_exactly(tmp_path):
    """The issue's case: served through the Llama path it matched transformers for one token,
    then diverged. A worker started on the folder now computes the window: token-identical to
    transformers, whose output without the window differs."""
    from kvmesh.workers.models.loader import hf_folder_for

    hf = hf_model("mistral", sliding_window=24)
    folder = save_folder(hf, tmp_path / "mistral-w24", hf_folder_for("smollm2")[0])
    assert load_model(str(folder)).config.sliding_window == 24
    engine = Engine(WorkerConfig(model=str(folder), kv_cache_bytes=1 << 20, page_size=16))
    prompt = PROMPTS[2]  # 70 tokens
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = hf_greedy(hf, prompt, 16)
    assert engine.generate([prompt], params) == [expected]
    assert hf_greedy(hf_model("mistral"), prompt, 16) != expected
    engine.close()


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
                config_from_hf(hf_config("mistral", head_dim=32)),
                config_from_hf(hf_config("mistral", sliding_window=24)),
                config_from_hf(hf_config("mistral", sliding_window=23))]
    identities = {base.kv_identity()} | {v.kv_identity() for v in variants}
    assert len(identities) == 1 + len(variants)
    assert json.loads(base.kv_identity())["family"] == "mistral"
    # the EOS ids change no K/V
    assert config_from_hf(hf_config("mistral", eos_token_id=7)).fingerprint == base.fingerprint
    # which layers slide does
    qwen2 = [config_from_hf(hf_config("qwen2", use_sliding_window=True, sliding_window=16,
                                      max_window_layers=layers)) for layers in (0, 1, 2)]
    assert len({cfg.fingerprint for cfg in qwen2}) == 3


def test_models_differing_only_in_config_never_share_a_namespace(tmp_path):
    """One safetensors file (one weights fingerprint) under one folder name, five config.json:
    Mistral, the same labelled Llama, Mistral with another RoPE theta, and with sliding windows
    of 24 and 23. Each gets its own namespace, so its page keys; loading a folder again keeps
    its namespace."""
    from kvmesh.workers.models.loader import hf_folder_for

    original = save_folder(hf_model("mistral"), tmp_path / "a" / "tiny",
                           hf_folder_for("smollm2")[0])
    edits = {"b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
             "c": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
             "d": {"sliding_window": 24}, "e": {"sliding_window": 23}}
    folders = [original]
    for parent, edit in edits.items():
        folder = tmp_path / parent / "tiny"
        shutil.copytree(original, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        folders.append(folder)
    loaded = [load_model(str(folder)) for folder in folders]
    assert [m.config.family for m in loaded] == ["mistral", "llama"] + ["mistral"] * 3
    assert [m.config.sliding_window for m in loaded] == [None, None, None, 24, 23]
    assert len({m.weights_fingerprint for m in loaded}) == 1
    assert len({m.model_fingerprint for m in loaded}) == 5

    def namespace(model):
        engine = Engine(WorkerConfig(model="tiny", kv_cache_bytes=1 << 20), loaded=model)
        engine.close()
        return engine.namespace()

    namespaces = [namespace(m) for m in loaded]
    assert len({ns.digest for ns in namespaces}) == 5
    prompt = list(range(40))
    assert len({ns.page_keys(prompt)[0] for ns in namespaces}) == 5
    assert namespace(load_model(str(original))) == namespaces[0]


def test_a_head_dim_the_triton_kernels_cannot_take_fails_when_the_worker_starts():
    _, loaded = build("qwen3", head_dim=24)
    with pytest.raises(InvalidConfig, match="power of two >= 16; this model's is 24"):
        Engine(WorkerConfig(model="tiny", kv_cache_bytes=1 << 20, attention_backend="triton"),
               loaded=loaded)
