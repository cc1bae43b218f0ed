"""Which family definition runs a model: transformers' `architectures` (or, where a config
names none, its `model_type`) -> the CausalLM subclass. Anything else is a ModelLoadError that
names what is supported."""

from __future__ import annotations

from typing import Any

from kvmesh.workers.errors import ModelLoadError
from kvmesh.workers.models.causal_lm import CausalLM
from kvmesh.workers.models.config import ModelConfig
from kvmesh.workers.models.llama import LlamaForCausalLM
from kvmesh.workers.models.mistral import MistralForCausalLM
from kvmesh.workers.models.qwen2 import Qwen2ForCausalLM
from kvmesh.workers.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: tuple[type[CausalLM], ...] = (
    LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)
_BY_ARCHITECTURE = {arch: cls for cls in MODEL_CLASSES for arch in cls.architectures}
_BY_MODEL_TYPE = {t: cls for cls in MODEL_CLASSES for t in cls.model_types}
_BY_FAMILY = {cls.family: cls for cls in MODEL_CLASSES}


def supported() -> str:
    """The supported architectures, for error messages and docs."""
    return ", ".join(f"{arch} ({cls.family})" for arch, cls in _BY_ARCHITECTURE.items())


def model_class_for(hf: Any) -> type[CausalLM]:
    """The class of transformers config `hf`: by its `architectures` when it names any (all
    must be one supported class), else by its `model_type`."""
    archs = list(getattr(hf, "architectures", None) or [])
    if archs:
        classes = {_BY_ARCHITECTURE.get(arch) for arch in archs}
        if len(classes) == 1 and None not in classes:
            return classes.pop()  # type: ignore[return-value]
        what = f"architecture {', '.join(archs)}"
    else:
        model_type = getattr(hf, "model_type", None)
        if model_type in _BY_MODEL_TYPE:
            return _BY_MODEL_TYPE[model_type]
        what = f"model_type {model_type!r}"
    raise ModelLoadError(f"unsupported {what}; kvmesh supports {supported()}")


def config_from_hf(hf: Any) -> ModelConfig:
    """Our config of transformers config `hf` (its family's reading, refusals included)."""
    return model_class_for(hf).config_from_hf(hf)


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    """The class that runs `cfg`."""
    return _BY_FAMILY[cfg.family]
