"""OpenAI response bodies (whole and streamed) built from the service's Chunks."""

from __future__ import annotations

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
    """Turns chunks into SSE `data:` payloads in OpenAI's order: for chat, a role delta first
    per completion; a finish chunk per completion; an optional usage chunk with no choices."""

    def __init__(self, prep: Prepared, model: str) -> None:
        self.prep = prep
        self.model = model
        self.usage = UsageTotals(prompt_tokens=len(prep.prompt_ids))
        self._started: set[int] = set()
        self._with_usage = prep.parsed.include_usage

    def _event(self, choice: dict) -> dict:
        event = {**_head(self.prep, self.model, True), "choices": [choice]}
        if self._with_usage:
            event["usage"] = None
        return event

    def events(self, chunk: Chunk) -> list[dict]:
        self.usage.add(chunk)
        out = []
        i = chunk.index
        if self.prep.parsed.is_chat:
            if i not in self._started:
                self._started.add(i)
                out.append(self._event({"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}))
            if chunk.text:
                out.append(self._event({"index": i, "delta": {"content": chunk.text},
                                        "logprobs": None, "finish_reason": None}))
            if chunk.finish_reason is not None:
                out.append(self._event({"index": i, "delta": {}, "logprobs": None,
                                        "finish_reason": chunk.finish_reason}))
        elif chunk.text or chunk.finish_reason is not None:
            out.append(self._event({"index": i, "text": chunk.text, "logprobs": None,
                                    "finish_reason": chunk.finish_reason}))
        return out

    def final_events(self) -> list[dict]:
        if not self._with_usage:
            return []
        return [{**_head(self.prep, self.model, True), "choices": [], "usage": self.usage.body()}]
