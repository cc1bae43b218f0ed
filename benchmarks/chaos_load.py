"""The chaos benchmark's load: OpenAI requests (chat and completions, streamed or not, several
tenants, some greedy and checked against a reference answer, some left mid-request) and the
outcome of each: ok, wrong, failed (with a cause) or disconnected on purpose."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

SYSTEM = ("You are a concise assistant for a small bakery in Lyon. The bakery opens at seven, "
          "sells bread, croissants and tarts, closes on Mondays, and takes orders by phone. "
          "Answer in one or two short sentences.")
QUESTIONS = [
    "When does the bakery open?", "Is the bakery open on Monday?", "What does the bakery sell?",
    "How can I order a cake?", "Do you sell croissants?", "Where is the bakery?",
    "Can I buy a tart on Sunday?", "What is the best bread to buy?", "Do you deliver?",
    "What should I bring to a picnic?", "Is there coffee?", "What time is it best to come?",
]
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Spec:
    prompt_id: int
    is_chat: bool
    is_stream: bool
    is_greedy: bool
    is_disconnect: bool
    api_key: str

    @property
    def kind(self) -> str:
        return ("chat" if self.is_chat else "completion") + ("/stream" if self.is_stream else "")


@dataclass
class Outcome:
    spec: Spec
    started: float  # monotonic seconds
    latency_s: float
    status: str  # ok | wrong | failed | disconnected
    cause: str = ""
    text: str = ""
    num_events: int = 0  # streamed content events received before the end


def body(spec: Spec, max_tokens: int) -> dict:
    question = QUESTIONS[spec.prompt_id % len(QUESTIONS)]
    payload: dict = {"max_tokens": max_tokens, "stream": spec.is_stream}
    if spec.is_chat:
        payload["messages"] = [{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": question}]
    else:
        payload["prompt"] = f"{SYSTEM}\n\nQuestion: {question}\nAnswer:"
    if spec.is_greedy:
        payload["temperature"] = 0
    else:
        payload.update(temperature=0.8, top_p=0.95)
    return payload


def random_spec(rng: random.Random, num_prompts: int, api_keys: list[str],
                disconnect_rate: float) -> Spec:
    return Spec(prompt_id=rng.randrange(num_prompts), is_chat=rng.random() < 0.5,
                is_stream=rng.random() < 0.5, is_greedy=rng.random() < 0.8,
                is_disconnect=rng.random() < disconnect_rate, api_key=rng.choice(api_keys))


def _path(spec: Spec) -> str:
    return "/v1/chat/completions" if spec.is_chat else "/v1/completions"


def _error_cause(status: int, text: str) -> str:
    try:
        code = json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = text[:60]
    return f"HTTP {status} {code}"


async def _plain(client: httpx.AsyncClient, spec: Spec, payload: dict) -> tuple[str, str, int]:
    """(status, cause or text, 0) of a request answered in one body."""
    resp = await client.post(_path(spec), json=payload,
                             headers={"Authorization": f"Bearer {spec.api_key}"})
    if resp.status_code != 200:
        return "failed", _error_cause(resp.status_code, resp.text), 0
    choice = resp.json()["choices"][0]
    return "ok", choice["message"]["content"] if spec.is_chat else choice["text"], 0


async def _streamed(client: httpx.AsyncClient, spec: Spec, payload: dict,
                    leave_after: int | None) -> tuple[str, str, int]:
    """(status, cause or text, content events) of an SSE request; leaves after `leave_after`
    content events if given."""
    pieces: list[str] = []
    async with client.stream("POST", _path(spec), json=payload,
                             headers={"Authorization": f"Bearer {spec.api_key}"}) as resp:
        if resp.status_code != 200:
            return "failed", _error_cause(resp.status_code, (await resp.aread()).decode()), 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return "ok", "".join(pieces), len(pieces)
            event = json.loads(data)
            if "error" in event:  # in-band: the headers were already sent
                code = event["error"].get("code")
                return "failed", f"in-band {code} after tokens were sent", len(pieces)
            choice = event["choices"][0] if event.get("choices") else {}
            piece = (choice.get("delta") or {}).get("content") if spec.is_chat \
                else choice.get("text")
            if piece:
                pieces.append(piece)
                if leave_after is not None and len(pieces) >= leave_after:
                    return "disconnected", "", len(pieces)
    return "failed", "stream ended without [DONE]", len(pieces)


async def send(client: httpx.AsyncClient, spec: Spec, max_tokens: int,
               reference: dict[tuple[int, bool], str] | None, rng: random.Random) -> Outcome:
    """One request. A greedy answer is compared with `reference[(prompt_id, is_chat)]`."""
    payload = body(spec, max_tokens)
    started = time.monotonic()
    try:
        if spec.is_stream:
            leave_after = rng.randint(1, 4) if spec.is_disconnect else None
            status, text, num_events = await _streamed(client, spec, payload, leave_after)
        elif spec.is_disconnect:  # leave before the answer; if it comes first, check it
            try:
                status, text, num_events = await asyncio.wait_for(
                    _plain(client, spec, payload), timeout=rng.uniform(0.05, 0.5))
            except TimeoutError:
                status, text, num_events = "disconnected", "", 0
        else:
            status, text, num_events = await _plain(client, spec, payload)
    except httpx.TimeoutException as exc:
        status, text, num_events = "failed", f"client timeout ({type(exc).__name__})", 0
    except httpx.HTTPError as exc:
        status, text, num_events = "failed", f"{type(exc).__name__}: {exc}"[:120], 0
    latency = time.monotonic() - started
    if status == "failed":
        return Outcome(spec, started, latency, status, cause=text, num_events=num_events)
    if status == "ok" and spec.is_greedy and reference is not None:
        expected = reference[(spec.prompt_id, spec.is_chat)]
        if text != expected:
            return Outcome(spec, started, latency, "wrong", cause=f"expected {expected!r}",
                           text=text, num_events=num_events)
    return Outcome(spec, started, latency, status, text=text, num_events=num_events)


async def compute_reference(client: httpx.AsyncClient, num_prompts: int, api_key: str,
                            max_tokens: int) -> dict[tuple[int, bool], str]:
    """Greedy answers of every (prompt, chat or completion) on the healthy stack, each asked
    twice (the second time mostly from cache); raises if the two differ."""
    answers: dict[tuple[int, bool], str] = {}
    for attempt in range(2):
        for prompt_id in range(num_prompts):
            for is_chat in (False, True):
                spec = Spec(prompt_id, is_chat, False, True, False, api_key)
                outcome = await send(client, spec, max_tokens, None, random.Random(0))
                if outcome.status != "ok":
                    raise RuntimeError(f"reference request failed: {outcome}")
                key = (prompt_id, is_chat)
                if attempt == 1 and answers[key] != outcome.text:
                    raise RuntimeError(f"reference not reproducible for {key}: "
                                       f"{answers[key]!r} then {outcome.text!r}")
                answers[key] = outcome.text
    return answers
