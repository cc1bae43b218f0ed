"""OpenAI request bodies -> checked, typed requests. Every check of a body field lives here, so
each bad request gets one clear 4xx message naming the field."""

from __future__ import annotations

import math
from typing import Any

from kvmesh.router.errors import InvalidRequest, PromptTooLong
from kvmesh.router.requests import ParsedRequest, Sampling

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0
MAX_SEED = (1 << 64) - 1
MAX_INT32 = (1 << 31) - 1  # token ids travel as int32 (page keys); top_k as int32
MAX_MAX_TOKENS = MAX_INT32  # the context length bounds it further, once known
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _short(value: Any, limit: int = 60) -> str:
    """repr for an error message, cut: a client's 4,000-digit number is not echoed back."""
    if _is_int(value) and value.bit_length() > 3 * limit:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _optional(body: dict, name: str, check: Any, what: str) -> Any:
    value = body.get(name)
    if value is not None and not check(value):
        raise InvalidRequest(f"'{name}' must be {what}, got {_short(value)}", param=name)
    return value


def _parse_sampling(body: dict, is_chat: bool) -> Sampling:
    max_tokens = _optional(body, "max_tokens", _is_int, "an integer")
    if is_chat and body.get("max_completion_tokens") is not None:
        max_tokens = _optional(body, "max_completion_tokens", _is_int, "an integer")
    has_mct = body.get("max_completion_tokens") is not None
    param = "max_completion_tokens" if has_mct else "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= MAX_MAX_TOKENS:
        raise InvalidRequest(f"'{param}' must be in [1, {MAX_MAX_TOKENS}], "
                             f"got {_short(max_tokens)}", param=param)
    if max_tokens is None and not is_chat:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    temperature = _optional(body, "temperature", _is_number, "a number")
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(f"'temperature' must be in [0, {MAX_TEMPERATURE}], got {temperature}",
                             param="temperature")
    top_p = _optional(body, "top_p", _is_number, "a number")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidRequest(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    top_k = _optional(body, "top_k", _is_int, "an integer")
    if top_k is not None and not -1 <= top_k <= MAX_INT32:
        raise InvalidRequest(f"'top_k' must be -1 or 0 (off) or in [1, {MAX_INT32}], "
                             f"got {_short(top_k)}", param="top_k")
    n = _optional(body, "n", _is_int, "an integer")
    if n is not None and not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be in [1, {MAX_N}], got {_short(n)}", param="n")
    seed = _optional(body, "seed", _is_int, "an integer")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"'seed' must be in [0, 2**64), got {_short(seed)}", param="seed")
    ignore_eos = _optional(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean")
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=max(top_k or 0, 0),
        n=n or 1,
        stop=_parse_stop(body.get("stop")),
        seed=seed,
        ignore_eos=bool(ignore_eos),
    )


def _parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if len(items) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"'stop' has more than {MAX_STOP_STRINGS} strings", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise InvalidRequest(f"each stop string must have 1 to {MAX_STOP_CHARS} characters",
                             param="stop")
    return tuple(items)


def _parse_prompt(prompt: Any) -> str | tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("'prompt' must not be empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t <= MAX_INT32 for t in prompt):
            raise InvalidRequest(f"prompt token ids must be in [0, {MAX_INT32}]", param="prompt")
        return tuple(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidRequest("batched prompts are not supported; send one prompt per request",
                             param="prompt")
    raise InvalidRequest("'prompt' must be a non-empty string or a list of token ids",
                         param="prompt")


def _parse_messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, "
                                 f"got {role!r}", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidRequest(f"messages[{i}].content: only text parts are supported",
                                         param="messages")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", param="messages")
        parsed.append({"role": "system" if role == "developer" else role, "content": content})
    return tuple(parsed)


def parse_request(body: Any, *, is_chat: bool) -> ParsedRequest:
    """Check a decoded JSON body. Raises InvalidRequest naming the bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = _optional(body, "model", lambda v: isinstance(v, str), "a string")
    stream = _optional(body, "stream", lambda v: isinstance(v, bool), "a boolean")
    options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    include_usage = bool((options or {}).get("include_usage", False))
    if options is not None and not stream:
        raise InvalidRequest("'stream_options' is only allowed with 'stream': true",
                             param="stream_options")
    user = _optional(body, "user", lambda v: isinstance(v, str), "a string")
    if is_chat:
        if "messages" not in body:
            raise InvalidRequest("'messages' is required", param="messages")
        prompt, messages = None, _parse_messages(body["messages"])
    else:
        if "prompt" not in body:
            raise InvalidRequest("'prompt' is required", param="prompt")
        prompt, messages = _parse_prompt(body["prompt"]), None
    return ParsedRequest(
        is_chat=is_chat,
        model=model,
        prompt=prompt,
        messages=messages,
        sampling=_parse_sampling(body, is_chat),
        stream=bool(stream),
        include_usage=include_usage,
        user=user,
    )


def check_prompt_size(parsed: ParsedRequest, max_chars: int | None) -> None:
    """Raises PromptTooLong if the prompt text has more than `max_chars` characters; checked
    before tokenizing, which takes seconds on megabytes. Token-id prompts are not text."""
    if max_chars is None:
        return
    if parsed.messages is not None:
        num_chars = sum(len(m["content"]) for m in parsed.messages)
    elif isinstance(parsed.prompt, str):
        num_chars = len(parsed.prompt)
    else:
        return
    if num_chars > max_chars:
        param = "messages" if parsed.is_chat else "prompt"
        raise PromptTooLong(f"the prompt has {num_chars} characters; this server accepts at "
                            f"most {max_chars}", param=param)
