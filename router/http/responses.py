"""OpenAI response bodies (whole and streamed) built from the service's Chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kvmesh.router.requests import Chunk, Prepared


@dataclass
class UsageTotals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cached_by_tier: dict[str, int] = field(default_factory=dict)

    def add(self, chunk: Chunk) -> None:
        usage = chunk.usage
        if usage is None:
            return
        self.prompt_tokens = max(self.prompt_tokens, usage.prompt_tokens)
        self.completion_tokens += usage.completion_tokens
        if usage.cached_tokens >= self.cached_tokens:
            self.cached_tokens = usage.cached_tokens
            self.cached_by_tier = dict(usage.cached_tokens_by_tier)

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "cached_tokens_by_tier": self.cached_by_tier,
            },
        }


def _head(prep: Prepared, model: str, streamed: bool) -> dict:
    if prep.parsed.is_chat:
        kind = "chat.completion.chunk" if streamed else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": prep.request_id, "object": kind, "created": prep.created, "model": model}


def full_response(prep: Prepared, model: str, chunks: list[Chunk]) -> dict:
    """Non-streamed body from every chunk of every completion."""
    num = prep.parsed.sampling.n
    texts = [""] * num
    finish: list[str | None] = [None] * num
    usage = UsageTotals(prompt_tokens=len(prep.prompt_ids))
    for chunk in chunks:
        texts[chunk.index] += chunk.text
        if chunk.finish_reason is not None:
            finish[chunk.index] = chunk.finish_reason
        usage.add(chunk)
    if prep.parsed.is_chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": None, "finish_reason": finish[i]} for i in range(num)]
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]}
                   for i in range(num)]
    return {**_head(prep, model, False), "choices": choices, "usage": usage.body()}


class StreamFormatter:
    """Turns chunks into SSE bytes in OpenAI's order: for chat, a role delta first per
    completion; a finish event per completion; an optional usage event with no choices.

    Every event of a request shares its head (id, object, created, model) and tail (`"usage":
    null` with include_usage): both are encoded once, and each event is the head, one choice
    encoded from the chunk's text and finish reason, and the tail. The bytes are those
    `json.dumps` gives for the whole event."""

    def __init__(self, prep: Prepared, model: str) -> None:
        self.prep = prep
        self.model = model
        self.usage = UsageTotals(prompt_tokens=len(prep.prompt_ids))
        self._started: set[int] = set()
        self._with_usage = prep.parsed.include_usage
        head = json.dumps(_head(prep, model, True))
        self._head = "data: " + head[:-1] + ', "choices": ['  # head: '{"id": ..., "model": ...}'
        self._tail = '], "usage": null}\n\n' if self._with_usage else "]}\n\n"

    def _event(self, index: int, body: str, finish: str) -> str:
        """One event; `body` is the choice's text or delta fields, `finish` its JSON value."""
        return (f'{self._head}{{"index": {index}, {body}, "logprobs": null, '
                f'"finish_reason": {finish}}}{self._tail}')

    def sse(self, chunk: Chunk) -> bytes:
        """The chunk's events (none, one, or a few: chat's role delta and finish), as one write."""
        self.usage.add(chunk)
        i = chunk.index
        finish = "null" if chunk.finish_reason is None else json.dumps(chunk.finish_reason)
        if not self.prep.parsed.is_chat:
            if not chunk.text and chunk.finish_reason is None:
                return b""
            return self._event(i, f'"text": {json.dumps(chunk.text)}', finish).encode()
        out = []
        if i not in self._started:
            self._started.add(i)
            out.append(self._event(i, '"delta": {"role": "assistant", "content": ""}', "null"))
        if chunk.text:
            out.append(self._event(i, f'"delta": {{"content": {json.dumps(chunk.text)}}}',
                                   "null"))
        if chunk.finish_reason is not None:
            out.append(self._event(i, '"delta": {}', finish))
        return "".join(out).encode()

    def final_sse(self) -> bytes:
        """The usage event (with include_usage), then the stream's end."""
        done = b"data: [DONE]\n\n"
        if not self._with_usage:
            return done
        usage = {**_head(self.prep, self.model, True), "choices": [], "usage": self.usage.body()}
        return sse_event(usage) + done


def sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
