"""OpenAI response bodies from chunks: n completions interleaved, usage, chat stream order."""

from __future__ import annotations

import json

from kvmesh.router.http.protocol import parse_request
from kvmesh.router.http.responses import StreamFormatter, full_response
from kvmesh.router.requests import Chunk, Prepared
from kvmesh.v1 import worker_pb2


def usage(completion: int, cached: int = 32) -> worker_pb2.Usage:
    return worker_pb2.Usage(prompt_tokens=40, completion_tokens=completion, cached_tokens=cached,
                            cached_tokens_by_tier={"device": cached})


def chunks() -> list[Chunk]:  # n=2, interleaved as a worker streams forked sequences
    return [Chunk(0, "Hel", [1], "w"), Chunk(1, "Bon", [2], "w"), Chunk(1, "jour", [3], "w"),
            Chunk(0, "lo", [4], "w", "stop", usage(2)), Chunk(1, "!", [5], "w", "length", usage(3))]


def sse_events(data: bytes) -> list[dict]:
    """The JSON events of an SSE body, checking its framing; [DONE] (if any) ends it."""
    parts = data.decode("ascii").split("\n\n")
    assert parts.pop() == ""  # every event ends in a blank line
    if parts and parts[-1] == "data: [DONE]":
        parts.pop()
    assert all(p.startswith("data: ") and "\n" not in p for p in parts)
    return [json.loads(p[len("data: "):]) for p in parts]


def prepared(body: dict, is_chat: bool) -> Prepared:
    return Prepared("id-1", list(range(40)), "", parse_request(body, is_chat=is_chat), created=7)


def test_full_completion_with_n_2():
    prep = prepared({"prompt": "x", "n": 2}, is_chat=False)
    body = full_response(prep, "m", chunks())
    assert body["object"] == "text_completion" and body["model"] == "m" and body["created"] == 7
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Hello", "stop"), (1, "Bonjour!", "length")]
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45,
                             "prompt_tokens_details": {"cached_tokens": 32,
                                                       "cached_tokens_by_tier": {"device": 32}}}


def test_full_chat_message():
    prep = prepared({"messages": [{"role": "user", "content": "x"}], "n": 2}, is_chat=True)
    body = full_response(prep, "m", chunks())
    assert body["object"] == "chat.completion"
    assert body["choices"][1]["message"] == {"role": "assistant", "content": "Bonjour!"}


def test_chat_stream_order_and_usage_chunk():
    prep = prepared({"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True,
                     "stream_options": {"include_usage": True}}, is_chat=True)
    formatter = StreamFormatter(prep, "m")
    events = sse_events(b"".join(formatter.sse(chunk) for chunk in chunks())
                        + formatter.final_sse())
    steps = [(c["index"], c["delta"], c["finish_reason"]) for e in events for c in e["choices"]]
    assert steps == [
        (0, {"role": "assistant", "content": ""}, None), (0, {"content": "Hel"}, None),
        (1, {"role": "assistant", "content": ""}, None), (1, {"content": "Bon"}, None),
        (1, {"content": "jour"}, None), (0, {"content": "lo"}, None), (0, {}, "stop"),
        (1, {"content": "!"}, None), (1, {}, "length")]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "id-1" for e in events)
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5


def test_completion_stream_without_usage():
    prep = prepared({"prompt": "x", "stream": True}, is_chat=False)
    formatter = StreamFormatter(prep, "m")
    events = sse_events(formatter.sse(chunks()[0]))
    assert events == [{"id": "id-1", "object": "text_completion", "created": 7, "model": "m",
                       "choices": [{"index": 0, "text": "Hel", "logprobs": None,
                                    "finish_reason": None}]}]
    assert formatter.final_sse() == b"data: [DONE]\n\n"
    assert formatter.sse(Chunk(0, "", [], "w")) == b""  # nothing to send: no event


TRICKY_TEXTS = ['say "hi"\\n', "line\nbreak\ttab\r", "caf\u00e9 \u2028 \U0001f600", "\x00\x1f",
                "</s>"]


def test_stream_bytes_are_json_dumps_of_each_event():
    """The template-built events equal json.dumps of the event dict, for any text."""
    for is_chat in (False, True):
        body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
        if is_chat:
            body = {"messages": [{"role": "user", "content": "x"}], **body}
            del body["prompt"]
        formatter = StreamFormatter(prepared(body, is_chat=is_chat), "m\u00e9")
        for text in TRICKY_TEXTS:
            for data in (formatter.sse(Chunk(0, text, [1], "w")),
                         formatter.sse(Chunk(0, text, [1], "w", "stop", usage(1)))):
                for event in data.split(b"\n\n")[:-1]:
                    payload = json.loads(event[len(b"data: "):])
                    assert event == b"data: " + json.dumps(payload).encode()
                    choice = payload["choices"][0]
                    assert choice.get("text", (choice.get("delta") or {}).get("content")) in (
                        text, "", None)
