"""The router against real processes: a store, two SmolLM2 workers (CPU) and `kvmesh router`.

Tests share one stack (module fixture) and run in file order: the last one kills a worker."""

from __future__ import annotations

import concurrent.futures
import json
import time

import openai
from live_stack import Stack

# ~330 tokens: 20 full pages shared by every prompt built on it
PREFIX = ("You are a careful assistant for a library. Answer briefly. " + " ".join(
    f"Rule {i}: shelve book number {i * 7} in aisle {i % 9} next to volume {i * 3}."
    for i in range(24)))
WORKER_HEADER = "x-kvmesh-worker"


def complete(client, prompt, **fields):
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, **fields}
    return client.post("/v1/completions", json=body)


def wait_indexed(stack: Stack, worker: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.metric("kvmesh:index_worker_pages", worker=worker) == 0:
        assert time.monotonic() < deadline, f"no KV events from {worker} reached the index"
        time.sleep(0.2)


def test_bad_requests_get_4xx_with_error_body_and_server_keeps_serving(stack: Stack):
    bad = [
        (None, "/v1/completions", {"prompt": "hi"}, 401, "invalid_api_key"),
        ("wrong-key", "/v1/completions", {"prompt": "hi"}, 401, "invalid_api_key"),
        ("key-alice", "/v1/completions", "{not json", 400, "invalid_request"),
        ("key-alice", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404,
         "model_not_found"),
        ("key-alice", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400,
         "invalid_request"),
        ("key-alice", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "max_completion_tokens": 0}, 400,
         "invalid_request"),
        ("key-alice", "/v1/completions", {"prompt": [7] * 2100, "max_tokens": 1}, 400,
         "context_length_exceeded"),
        ("key-alice", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "invalid_request"),
        ("key-alice", "/v1/chat/completions", {"messages": []}, 400, "invalid_request"),
        ("key-alice", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400,
         "invalid_request"),
        ("key-alice", "/v1/nothing", {}, 404, "not_found"),
    ]
    for key, path, body, status, code in bad:
        with stack.client(key) as client:
            content = body if isinstance(body, str) else json.dumps(body)
            response = client.post(path, content=content)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"]
    with stack.client() as client:
        response = complete(client, "The capital of France is")
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2
    assert stack.metric("kvmesh:http_errors_total", status="400") >= 7


def test_health_models_metrics(stack: Stack):
    with stack.client(None) as client:  # open paths need no key
        health = client.get("/health").json()
        assert health["status"] == "ok" and sorted(health["workers"]) == sorted(
            w.address for w in stack.workers)
        assert "kvmesh:time_to_first_token_seconds_bucket" in client.get("/metrics").text
    with stack.client() as client:
        models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    assert models["data"][0]["max_model_len"] == 2048


def test_openai_client_streams_chat_with_usage(stack: Stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="key-alice", max_retries=0)
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    whole = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=3, temperature=0)
    assert whole.choices[0].message.content == text  # greedy: same tokens either way
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_openai_client_streams_completions_n2_as_the_whole_answer(stack: Stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="key-alice", max_retries=0)
    kwargs = dict(model="SmolLM2-135M-Instruct.Q4_1", prompt="The three primary colors are",
                  max_tokens=8, temperature=0, n=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    texts, finish = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert finish == ["length", "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_shared_prefix_goes_to_the_worker_that_holds_it(stack: Stack):
    with stack.client() as client:
        first = complete(client, PREFIX + " Question 1: where is book 7?")
        holder = first.headers[WORKER_HEADER]
        other = next(w.address for w in stack.workers if w.address != holder)
        wait_indexed(stack, holder)
        # an unrelated prompt goes to the other (emptier) worker, so affinity is not luck
        unrelated = complete(client, "Write a haiku about the sea and the wind in spring.")
        assert unrelated.headers[WORKER_HEADER] == other
        for q in range(2, 5):
            response = complete(client, PREFIX + f" Question {q}: where is book {q * 7}?")
            assert response.status_code == 200
            assert response.headers[WORKER_HEADER] == holder
            details = response.json()["usage"]["prompt_tokens_details"]
            assert details["cached_tokens"] >= 19 * 16, details  # the shared pages
            assert details["cached_tokens_by_tier"].get("device", 0) >= 19 * 16, details
    assert stack.metric("kvmesh:routing_decisions_total", reason="prefix") >= 3


def test_two_api_keys_do_not_share_cached_tokens(stack: Stack):
    prompt = PREFIX + " Question 1: where is book 7?"
    with stack.client("key-alice") as alice, stack.client("key-bob") as bob:
        again = complete(alice, prompt).json()["usage"]["prompt_tokens_details"]
        assert again["cached_tokens"] >= 19 * 16  # alice's own earlier request
        first_bob = complete(bob, prompt).json()["usage"]["prompt_tokens_details"]
        assert first_bob["cached_tokens"] == 0, first_bob
        second_bob = complete(bob, prompt).json()["usage"]["prompt_tokens_details"]
        assert second_bob["cached_tokens"] >= 19 * 16  # bob reuses his own


def test_holder_killed_mid_run_requests_succeed_elsewhere(stack: Stack):
    with stack.client() as client:
        holder = complete(client, PREFIX + " Question 9: where is book 63?").headers[
            WORKER_HEADER]
    victim = next(w for w in stack.workers if w.address == holder)
    survivor = next(w.address for w in stack.workers if w.address != holder)
    routed_before = stack.metric("kvmesh:routing_decisions_total", worker=holder)

    def ask(q: int):
        with stack.client() as client:
            return complete(client, PREFIX + f" Question {q}: where is book {q}?",
                            max_tokens=12, ignore_eos=True)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, q) for q in range(10, 13)]
        deadline = time.monotonic() + 60
        while stack.metric("kvmesh:routing_decisions_total", worker=holder) < routed_before + 1:
            assert time.monotonic() < deadline, "nothing was routed to the prefix holder"
            time.sleep(0.05)
        victim.kill()  # mid-run: requests are generating on it
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    assert {r.headers[WORKER_HEADER] for r in responses} == {survivor}
    assert all(r.json()["usage"]["completion_tokens"] == 12 for r in responses)
    assert stack.metric("kvmesh:request_retries_total") >= 1
    # the survivor never computed this prefix: it came from the store
    tiers = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens_by_tier"]
             for r in responses]
    assert any(t.get("store", 0) >= 16 for t in tiers), tiers
    with stack.client(None) as client:
        health = client.get("/health").json()
    assert health["workers"] == {holder: False, survivor: True}
