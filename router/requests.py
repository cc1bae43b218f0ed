"""A checked OpenAI request as the router's core sees it (made by router.http.protocol), so the
core never depends on the HTTP front; the request once prepared, and the chunks of its answer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvmesh.v1 import worker_pb2


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


@dataclass
class Chunk:
    """One streamed piece of completion `index`; `finish_reason` and `usage` on its last."""

    index: int
    text: str
    token_ids: list[int]
    worker_id: str
    finish_reason: str | None = None
    usage: worker_pb2.Usage | None = None


@dataclass
class Prepared:
    request_id: str
    prompt_ids: list[int]
    salt: str
    parsed: ParsedRequest
    created: int = field(default_factory=lambda: int(time.time()))
