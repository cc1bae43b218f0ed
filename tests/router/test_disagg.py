"""Prefill/decode disaggregation through the router: a real store, a prefill worker, a decode
worker (SmolLM2 on CPU) and a real router. A prompt whose uncached part reaches
--pd-min-tokens gets its first token from the prefill worker and the rest from the decode
worker, which loads the prompt's pages from the store; the text equals a colocated run's. A
decode worker killed before its first token is replaced by the other one."""

from __future__ import annotations

import httpx
import pytest
from live_stack import running_stack, sse_events

from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.service.client import WorkerClient

PAGE_SIZE = 16
PD_MIN_TOKENS = 64
NUM_TOKENS = 12
HEADERS = {"Authorization": "Bearer key-alice"}


@pytest.fixture(scope="module")
def stack():
    with running_stack("kvmesh-disagg-test-",
                       ["--max-model-len", "512", "--kv-cache-bytes", str(32 << 20),
                        "--torch-threads", "1"], roles=("prefill", "decode", "decode"),
                       router_args=("--pd-min-tokens", str(PD_MIN_TOKENS))) as stack:
        yield stack


def _prompt(seed: int, length: int) -> list[int]:
    """Token ids of a prompt no other test sends (the store keeps what earlier tests wrote)."""
    return [100 + (seed * 7919 + i * 104729) % 40000 for i in range(length)]


def _colocated(stack, prompt: list[int]) -> str:
    """Greedy text of `prompt` from the decode worker alone, under a salt of its own (so no
    cached page of any other run)."""
    with WorkerClient(stack.workers[1].address) as client:
        outputs = client.generate(prompt, SamplingParams(
            temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True),
            tenant_salt="colocated-reference", timeout=120)
        return "".join(o.text for o in outputs)


def _complete(stack, prompt: list[int], stream: bool, on_chunk=None) -> tuple[str, dict]:
    body = {"prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if not stream:
        response = httpx.post(stack.url + "/v1/completions", json=body, headers=HEADERS,
                              timeout=120)
        assert response.status_code == 200, response.text
        data = response.json()
        return data["choices"][0]["text"], data["usage"]
    body["stream_options"] = {"include_usage": True}
    text, usage = "", {}
    for event in sse_events(stack.url + "/v1/completions", body, HEADERS):
        text += "".join(choice["text"] for choice in event["choices"])
        usage = event.get("usage") or usage
        if on_chunk is not None:
            on_chunk()
    return text, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_long_prompt_is_prefilled_elsewhere_and_decoded_from_the_store(stack, stream):
    prompt = _prompt(1 + stream, 200)
    before = stack.metric("kvmesh:pd_requests_total")
    text, usage = _complete(stack, prompt, stream)
    assert stack.metric("kvmesh:pd_requests_total") == before + 1
    assert text == _colocated(stack, prompt)
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == NUM_TOKENS
    # the decode worker computed less than a page of the prompt: the rest came from the store
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert len(prompt) - cached < PAGE_SIZE
    assert usage["prompt_tokens_details"]["cached_tokens_by_tier"] == {"store": cached}
    assert stack.metric("kvmesh:pd_transfer_bytes_total") > 0
    assert stack.metric("kvmesh:pd_transfer_seconds_count") >= 1


def test_a_short_prompt_stays_on_the_decode_worker(stack):
    prompt = _prompt(3, PD_MIN_TOKENS // 2)
    before = stack.metric("kvmesh:pd_requests_total")
    text, usage = _complete(stack, prompt, stream=False)
    assert stack.metric("kvmesh:pd_requests_total") == before
    assert text == _colocated(stack, prompt)
    assert usage["completion_tokens"] == NUM_TOKENS


def test_a_prompt_the_store_holds_already_is_not_prefilled_again(stack):
    prompt = _prompt(4, 200)
    _complete(stack, prompt, stream=False)
    before = stack.metric("kvmesh:pd_requests_total")
    text, usage = _complete(stack, prompt, stream=False)
    assert stack.metric("kvmesh:pd_requests_total") == before
    assert text == _colocated(stack, prompt)
    assert len(prompt) - usage["prompt_tokens_details"]["cached_tokens"] < PAGE_SIZE


@pytest.fixture(scope="module")
def push_stack():
    with running_stack("kvmesh-disagg-push-test-",
                       ["--max-model-len", "512", "--kv-cache-bytes", str(32 << 20),
                        "--torch-threads", "1", "--host-tier-bytes", str(64 << 20)],
                       roles=("prefill", "decode"),
                       router_args=("--pd-min-tokens", str(PD_MIN_TOKENS),
                                    "--pd-transfer", "push")) as stack:
        yield stack


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_pushed_pages_reach_the_decode_workers_host_tier(push_stack, stream):
    prompt = _prompt(7 + stream, 200)
    text, usage = _complete(push_stack, prompt, stream)
    assert text == _colocated(push_stack, prompt)
    assert usage["completion_tokens"] == NUM_TOKENS
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert len(prompt) - cached < PAGE_SIZE
    assert usage["prompt_tokens_details"]["cached_tokens_by_tier"] == {"cpu": cached}
    assert push_stack.metric("kvmesh:pd_transfer_bytes_total") > 0
    assert push_stack.metric("kvmesh:pd_fallbacks_total") == 0


def _store_hits(stack) -> list[int]:
    """Prompt tokens each decode worker loaded from the store so far."""
    hits = []
    for worker in stack.workers[1:]:
        with WorkerClient(worker.address) as client:
            hits.append(client.stats().prefix_hits.get("store", 0))
    return hits


def test_a_decode_worker_killed_before_its_first_token_is_replaced(stack):
    """Runs last: it kills a worker. The decode worker that loaded a prompt's pages holds them
    on its device, so the router sends it the longer prompt's rest too; it dies as the client
    gets the prefill worker's first token, and the other decode worker goes on from the store."""
    prefix = _prompt(5, 200)
    prompt = prefix + _prompt(6, 100)
    reference = _colocated(stack, prompt)
    before = _store_hits(stack)
    _complete(stack, prefix, stream=False)
    grown = [after - was for after, was in zip(_store_hits(stack), before, strict=True)]
    chosen = stack.workers[1 + grown.index(max(grown))]
    retries = stack.metric("kvmesh:request_retries_total")
    requests = stack.metric("kvmesh:pd_requests_total")

    def kill_at_first_token() -> None:
        if chosen.popen.poll() is None:
            chosen.kill()

    text, usage = _complete(stack, prompt, stream=True, on_chunk=kill_at_first_token)
    assert chosen.popen.poll() is not None
    assert text == reference
    assert usage["completion_tokens"] == NUM_TOKENS
    assert stack.metric("kvmesh:pd_requests_total") == requests + 1
    assert stack.metric("kvmesh:request_retries_total") == retries + 1
    # the replacement took the whole prompt's pages from the store (both prompts' prefills)
    assert len(prompt) - usage["prompt_tokens_details"]["cached_tokens"] < PAGE_SIZE
