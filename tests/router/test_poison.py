"""Issue 22, item 1, end to end: a chat whose sampling parameters used to kill a worker's engine
(temperature 1e-40: logits / T overflow to inf, softmax gives NaN) goes through the real router
to real workers. It gets a non-5xx answer, a normal chat beside it completes, and afterwards both
workers are still healthy and serve the next request."""

from __future__ import annotations

import concurrent.futures
import json

from live_stack import Stack

MESSAGES = [{"role": "user", "content": "Name three colors of the rainbow."}]
POISONS = [
    {"temperature": 1e-40},
    {"temperature": 1e-40, "stream": True},
    {"temperature": 1e-30, "top_p": 1e-30},
    {"temperature": 0.7, "top_k": 2**31 - 1, "seed": 1},
]


def chat(stack: Stack, **fields):
    body = {"messages": MESSAGES, "max_tokens": 6, **fields}
    with stack.client() as client:
        return client.post("/v1/chat/completions", json=body)


def text_of(response) -> str:
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: {")]
        assert all("error" not in e for e in events), events
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    return response.json()["choices"][0]["message"]["content"]


def test_poison_chat_gets_a_clean_answer_and_both_workers_stay_healthy(stack: Stack):
    reference = chat(stack, temperature=0)
    assert reference.status_code == 200
    greedy_text = text_of(reference)
    retries = stack.metric("kvmesh:request_retries_total")
    with concurrent.futures.ThreadPoolExecutor(len(POISONS) + 1) as pool:
        normal = pool.submit(chat, stack, temperature=0, max_tokens=24)
        poisoned = [pool.submit(chat, stack, **fields) for fields in POISONS]
        for fields, future in zip(POISONS, poisoned, strict=True):
            response = future.result()
            assert response.status_code == 200, (fields, response.text)
            text = text_of(response)
            if fields.get("temperature", 1) < 1e-5:  # below the floor: greedy
                assert text == greedy_text, fields
        assert normal.result().status_code == 200
        assert text_of(normal.result()).startswith(greedy_text)
    assert stack.metric("kvmesh:request_retries_total") == retries  # nothing failed over
    with stack.client() as client:
        health = client.get("/health").json()
    assert health["status"] == "ok" and list(health["workers"].values()) == [True, True]
    again = chat(stack, temperature=0)
    assert again.status_code == 200 and text_of(again) == greedy_text
