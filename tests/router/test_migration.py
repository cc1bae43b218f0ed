"""Mid-stream migration: a worker SIGKILLed while it streams a completion; the router resends the
prompt plus the tokens already sent to the other worker (which takes the prefix's pages from the
store), and the client's stream goes on without an error, greedy text identical to an
undisturbed run. Real store, two real SmolLM2 workers and a real router."""

from __future__ import annotations

import httpx
import pytest
from live_stack import Proc, running_stack, sse_events

from kvmesh.workers.service.client import WorkerClient

NUM_TOKENS = 64
PROMPT = "Write a long story about a lighthouse keeper and the sea. Once upon a time,"
HEADERS = {"Authorization": "Bearer key-alice"}


@pytest.fixture(scope="module")
def pair():
    with running_stack("kvmesh-migration-test-",
                       ["--max-model-len", "512", "--kv-cache-bytes", str(32 << 20),
                        "--torch-threads", "1"]) as stack:
        yield stack.url, {w.address: w for w in stack.workers}


def _stream(url: str, on_chunk=None) -> tuple[str, dict, list[str]]:
    """Text, usage and finish reasons of a streamed greedy completion."""
    body = {"prompt": PROMPT, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text, usage, finishes, num_chunks = "", {}, [], 0
    for event in sse_events(url + "/v1/completions", body, HEADERS):
        for choice in event["choices"]:
            text += choice["text"]
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
        usage = event.get("usage") or usage
        num_chunks += 1
        if on_chunk is not None:
            on_chunk(num_chunks)
    return text, usage, finishes


def _busy_worker(workers: dict[str, Proc]) -> str:
    for address in workers:
        with WorkerClient(address) as client:
            if client.stats(timeout=5).num_running:
                return address
    raise AssertionError("no worker is running the request")


def test_worker_killed_mid_stream_the_stream_goes_on_unchanged(pair):
    url, workers = pair
    reference, ref_usage, ref_finishes = _stream(url)
    assert ref_usage["completion_tokens"] == NUM_TOKENS and ref_finishes == ["length"]
    killed: list[str] = []

    def kill_after_a_few_tokens(num_chunks: int) -> None:
        if num_chunks == 6 and not killed:
            address = _busy_worker(workers)
            workers[address].kill()
            killed.append(address)

    text, usage, finishes = _stream(url, kill_after_a_few_tokens)
    assert killed, "the stream ended before a worker could be killed"
    assert text == reference
    assert finishes == ["length"]
    assert usage["completion_tokens"] == NUM_TOKENS
    assert usage["prompt_tokens"] == ref_usage["prompt_tokens"]
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert "kvmesh:request_migrations_total 1.0" in metrics
