"""SamplingParams: per-request sampling settings, validated into InvalidRequest."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvmesh.workers.errors import InvalidRequest

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256  # each generated token is checked against them
# Temperatures below this sample greedily (as in vLLM): logits / 1e-40 overflow fp32 to inf and
# softmax turns them into NaN, while the distribution they ask for is the argmax anyway.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """temperature 0 = greedy, and so is any temperature below MIN_TEMPERATURE; top_k 0 = off
    (a top_k past the vocabulary keeps every token); top_p 1.0 = off; seed None =
    nondeterministic."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequest naming the first bad field."""
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}], got {self.n}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidRequest(f"stop must hold at most {MAX_STOP_STRINGS} non-empty strings")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"stop_token_ids holds {len(self.stop_token_ids)} ids; at most "
                                 f"{MAX_STOP_TOKEN_IDS}")
        for token_id in self.stop_token_ids:
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                raise InvalidRequest(f"stop token id {token_id} out of the vocabulary")
