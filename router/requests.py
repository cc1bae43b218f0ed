"""A checked OpenAI request as the router's core sees it (made by router.http.protocol), so the
core never depends on the HTTP front."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None  # None = up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class ParsedRequest:
    """A checked completion or chat request; exactly one of prompt / messages is set."""

    is_chat: bool
    model: str | None
    prompt: str | tuple[int, ...] | None
    messages: tuple[dict[str, str], ...] | None
    sampling: Sampling
    stream: bool
    include_usage: bool
    user: str | None
