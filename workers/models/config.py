"""The model configuration every family shares, read from a transformers config.

`ModelConfig.from_hf` takes the fields all our families read the same way and refuses, with a
ModelLoadError, every config feature no family implements (another activation, RoPE types other
than default / llama3, partial rotary, mixture-of-experts, per-layer attention other than what
the family computes). Each family (llama.py, qwen2.py, ...) adds its own flags and refusals on
top: a uniform sliding window (Mistral, `uniform_window`) or one on the layers transformers'
`layer_types` names (Qwen2/Qwen3, `windows_by_layer_type`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import xxhash

from kvmesh.workers.errors import ModelLoadError

ROPE_TYPES = ("default", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")
# config fields that make a model a mixture of experts (Mixtral, Qwen2/3-MoE, DeepSeek, ...)
_MOE_FIELDS = ("num_experts", "num_local_experts", "num_experts_per_tok", "n_routed_experts",
               "moe_intermediate_size")
# fields that do not change a page's K/V, left out of `kv_identity`
_NOT_KV_FIELDS = frozenset({"eos_token_ids"})


@dataclass(frozen=True)
class ModelConfig:
    """What our forward needs of a model. `family` names the definition (registry.py) that
    runs it; `qkv_bias` and `qk_norm` are the family's attention variants."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # llama3 params, as sorted items
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    qkv_bias: bool = False  # bias on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    # a query at position p attends keys at p - sliding_window < k <= p on every layer but
    # full_attention_layers, which attend every earlier key; None: every layer attends every
    # key. Only set where it can matter (smaller than max_position_embeddings, on some layer).
    sliding_window: int | None = None
    full_attention_layers: tuple[int, ...] = ()  # sorted layer indices

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"model config {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_attention_heads {self.num_heads} is not a multiple of "
                                 f"num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim {self.head_dim} must be even (RoPE)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelLoadError(f"sliding_window must be >= 1, got {self.sliding_window}")
        full = self.full_attention_layers
        if full and (self.sliding_window is None or list(full) != sorted(set(full))
                     or full[0] < 0 or len(full) >= self.num_layers
                     or full[-1] >= self.num_layers):
            raise ModelLoadError(f"full_attention_layers {full} must be sorted distinct layers "
                                 f"of {self.num_layers}, some left to slide by a window")

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer`; None where it attends every earlier key."""
        return None if layer in self.full_attention_layers else self.sliding_window

    def attention_span(self, context_len: int) -> int:
        """The most keys one query attends, on any layer, in a context of context_len tokens
        (what a split-KV decode shares out)."""
        if self.sliding_window is None or self.full_attention_layers:
            return context_len
        return min(context_len, self.sliding_window)

    @classmethod
    def from_hf(cls, hf: Any, family: str, **flags: Any) -> ModelConfig:
        """The shared fields of transformers config `hf`, plus the family's `flags` (qkv_bias,
        qk_norm, sliding_window, full_attention_layers). Raises ModelLoadError for a feature no
        family implements, and where the attention of each layer that the config declares
        (`layer_types`) is not what the flags compute."""
        _refuse_unimplemented(hf)
        theta, scaling = _rope(hf)
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        try:
            head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
            cfg = cls(
                family=family,
                vocab_size=hf.vocab_size,
                hidden_size=hf.hidden_size,
                intermediate_size=hf.intermediate_size,
                num_layers=hf.num_hidden_layers,
                num_heads=hf.num_attention_heads,
                num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                head_dim=head_dim,
                rms_norm_eps=float(hf.rms_norm_eps),
                rope_theta=theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
                max_position_embeddings=int(hf.max_position_embeddings),
                eos_token_ids=eos_ids,
                **flags,
            )
        except (AttributeError, TypeError) as exc:
            raise ModelLoadError(f"{family} config is incomplete: {exc}") from exc
        _check_layer_types(hf, cfg)
        return cfg

    def kv_identity(self) -> str:
        """Canonical text of every field that changes what a page's K/V are (the family and
        all its shapes, RoPE, norms and attention variants; not the EOS ids): two configs that
        differ in any of them never share pages."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in _NOT_KV_FIELDS}
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        """xxh3_128 hex digest of `kv_identity`."""
        return xxhash.xxh3_128_hexdigest(self.kv_identity().encode())


def refuse(what: str, hf: Any) -> ModelLoadError:
    """The error for a config feature kvmesh does not implement (never served approximately)."""
    name = getattr(hf, "model_type", None) or type(hf).__name__
    return ModelLoadError(f"{name} config: {what} is not supported; kvmesh refuses a model it "
                          "would not compute exactly")


def refuse_flags(hf: Any, *names: str) -> None:
    """Refuse a config that turns on any of the boolean features `names` (e.g. attention_bias)
    that the family does not implement."""
    for name in names:
        if getattr(hf, name, False):
            raise refuse(f"{name}=true", hf)


def uniform_window(hf: Any) -> dict[str, Any]:
    """The flags of a config whose `sliding_window` applies to every layer (Mistral)."""
    return {"sliding_window": window_if_effective(hf, getattr(hf, "sliding_window", None))}


def windows_by_layer_type(hf: Any) -> dict[str, Any]:
    """The flags of transformers' per-layer windows (Qwen2, Qwen3): with use_sliding_window the
    layers `layer_types` names "sliding_attention" (by default those from max_window_layers on)
    slide by sliding_window, the others attend every key. A config without layer_types
    (transformers before 5, whose attention implementations applied these windows differently)
    is refused."""
    window = (window_if_effective(hf, getattr(hf, "sliding_window", None))
              if getattr(hf, "use_sliding_window", False) else None)
    if window is None:
        return {}
    layer_types = getattr(hf, "layer_types", None)
    if not layer_types:
        raise refuse("use_sliding_window without layer_types (transformers >= 5 names each "
                     "layer's attention)", hf)
    full = tuple(i for i, kind in enumerate(layer_types) if kind != "sliding_attention")
    if len(full) == len(layer_types):
        return {}
    return {"sliding_window": window, "full_attention_layers": full}


def window_if_effective(hf: Any, window: Any) -> int | None:
    """A config's sliding window where it can matter: None when unset or not smaller than the
    longest context (then every key is in every query's window)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise refuse(f"sliding_window {window!r}", hf)
    return window if window < int(hf.max_position_embeddings) else None


def _refuse_unimplemented(hf: Any) -> None:
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise refuse(f"hidden_act {act!r} (SwiGLU with silu only)", hf)
    for name in _MOE_FIELDS:
        if getattr(hf, name, None):
            raise refuse(f"mixture of experts ({name}={getattr(hf, name)!r})", hf)
    partial = getattr(hf, "partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):
        raise refuse(f"partial_rotary_factor {partial!r}", hf)


def _check_layer_types(hf: Any, cfg: ModelConfig) -> None:
    """Refuse a config whose `layer_types` (transformers' attention of each layer) is not what
    cfg computes: a "full_attention" layer attends every key, a "sliding_attention" one the
    config's effective window. Any other kind (chunked, ...), and a pattern the family does not
    read (Mistral slides every layer alike), is refused."""
    layer_types = getattr(hf, "layer_types", None)
    if not layer_types:
        return
    window = window_if_effective(hf, getattr(hf, "sliding_window", None))
    window_of_kind = {"full_attention": None, "sliding_attention": window}
    if len(layer_types) != cfg.num_layers or any(
            kind not in window_of_kind or cfg.window_of(i) != window_of_kind[kind]
            for i, kind in enumerate(layer_types)):
        computed = [cfg.window_of(i) for i in range(cfg.num_layers)]
        raise refuse(f"layer_types {list(layer_types)} (the {cfg.family} definition computes "
                     f"the windows {computed}, None for full attention)", hf)


def _rope(hf: Any) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, llama3 scaling items or None); refuses other RoPE types."""
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise refuse(f"rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})", hf)
    if rope_type == "default":
        return theta, None
    missing = [k for k in _LLAMA3_ROPE_KEYS if k not in rope]
    if missing:
        raise refuse(f"llama3 rope without {missing}", hf)
    return theta, tuple(sorted((k, rope[k]) for k in _LLAMA3_ROPE_KEYS))
