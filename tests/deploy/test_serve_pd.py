"""Prefill/decode disaggregation end to end: `kvmesh serve --prefill-workers 1 --decode-workers
1` (real store, two real SmolLM2 workers in fp32 on CPU, real router) driven by the official
`openai` client, against a colocated `kvmesh serve --workers 1` run of the same prompts (greedy
output identical as far as the API shows it: the same text, finish reason and token count).

The P/D stack's router sends prompts of at least PD_MIN_TOKENS uncached tokens through the
prefill worker and the store to the decode worker; shorter ones stay on the decode worker. One
stack of each kind for the module, started together; the last tests SIGKILL the prefill worker
(requests fall back to colocated) and then the decode worker (the stack stops)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from serve_stack import MAX_MODEL_LEN, Stack

PD_MIN_TOKENS = 64
PAGE_SIZE = 16  # the worker's default
MAX_TOKENS = 8
# the tier a decode worker names for pages the prefill worker handed over (workers/engine/
# outputs.py TIERS): the store's, whether read over gRPC, NIXL or same-host shared memory
HANDOFF_TIERS = {"store"}
KEYS = {"alpha": "key-alpha", "beta": "key-beta", "gamma": "key-gamma"}  # tenant -> API key
_FP32 = ("--worker-arg=--dtype=float32",)
_WORDS = ["quick", "brown", "red", "slow", "grey", "young", "old", "tired", "small", "loud"]


def long_prompt(topic: str) -> str:
    """About 180 tokens, its first page unique to `topic` (so nothing earlier shares a page)."""
    items = " ".join(f"Item {i}: the {w} fox jumps over the lazy dog near the {topic} bank."
                     for i, w in enumerate(_WORDS))
    return f"Notes on {topic}. {items} Summary of {topic}:"


def short_prompt(topic: str) -> str:
    return f"Name three {topic} colors."


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cached_by_tier: dict[str, int]


def ask(client: openai.OpenAI, model: str, kind: str, prompt: str, stream: bool) -> Answer:
    """One greedy request, chat or completion, streamed (with usage) or not."""
    kwargs: dict = dict(model=model, max_tokens=MAX_TOKENS, temperature=0)
    if stream:
        kwargs.update(stream=True, stream_options={"include_usage": True})
    if kind == "chat":
        response = client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **kwargs)
    else:
        response = client.completions.create(prompt=prompt, **kwargs)
    if stream:
        chunks = list(response)
        choices = [c.choices[0] for c in chunks if c.choices]
        text = "".join((c.delta.content or "") if kind == "chat" else c.text for c in choices)
        (finish,) = [c.finish_reason for c in choices if c.finish_reason]
        usage = chunks[-1].usage
    else:
        choice = response.choices[0]
        text = choice.message.content if kind == "chat" else choice.text
        finish, usage = choice.finish_reason, response.usage
    details = usage.prompt_tokens_details
    by_tier = dict(details.model_extra.get("cached_tokens_by_tier") or {})
    return Answer(text, finish, usage.prompt_tokens, usage.completion_tokens,
                  details.cached_tokens, by_tier)


def metric(base_url: str, name: str) -> float:
    """Sum of every sample of `name` (all label sets) on the router's /metrics; 0 if none."""
    text = httpx.get(f"{base_url}/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {KEYS['alpha']}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"))


def _start_stack(tmp_path_factory, name: str, *extra: str) -> Stack:
    return Stack(tmp_path_factory.mktemp(name) / "data", *_FP32, *extra)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """(P/D stack, colocated stack), started at once: loading the models overlaps."""
    key_file = tmp_path_factory.mktemp("keys") / "api_keys"
    key_file.write_text("".join(f"{key}={tenant}\n" for tenant, key in KEYS.items()))
    pd = _start_stack(tmp_path_factory, "pd", "--prefill-workers", "1", "--decode-workers",
                      "1", f"--router-arg=--pd-min-tokens={PD_MIN_TOKENS}",
                      "--api-key-file", str(key_file))
    colocated = _start_stack(tmp_path_factory, "colocated", "--workers", "1")
    try:
        for stack in (pd, colocated):
            assert stack.wait_ready(300) == f"kvmesh serving on http://127.0.0.1:{stack.port}\n"
        yield pd, colocated
    finally:
        pd.close()
        colocated.close()


@pytest.fixture(scope="module")
def pd_stack(stacks):
    return stacks[0]


@pytest.fixture(scope="module")
def pd_url(pd_stack):
    return f"http://127.0.0.1:{pd_stack.port}"


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pd_client(pd_url):
    return _client(pd_url, KEYS["alpha"])


@pytest.fixture(scope="module")
def colocated_client(stacks):
    return _client(f"http://127.0.0.1:{stacks[1].port}")


@pytest.fixture(scope="module")
def model(pd_client, colocated_client):
    (pd_model,) = pd_client.models.list().data
    (colocated_model,) = colocated_client.models.list().data
    assert pd_model.id == colocated_model.id
    return pd_model.id


def test_the_stack_runs_one_prefill_and_one_decode_worker(pd_stack):
    assert len(pd_stack.child_pids("--role prefill")) == 1
    assert len(pd_stack.child_pids("--role decode")) == 1
    (router,) = pd_stack.child_pids(" router ")
    argv = open(f"/proc/{router}/cmdline", "rb").read().split(b"\0")
    assert argv.count(b"--prefill-worker") == 1 and argv.count(b"--decode-worker") == 1
    assert b"--worker" not in argv


def assert_handed_over(answer: Answer) -> None:
    """The decode worker took the prompt's pages from the prefill worker (through the store or
    shared memory) and computed less than one page of it."""
    assert answer.cached_tokens == sum(answer.cached_by_tier.values()), answer
    assert sum(answer.cached_by_tier.get(t, 0) for t in HANDOFF_TIERS) > 0, answer
    assert 0 <= answer.prompt_tokens - answer.cached_tokens <= PAGE_SIZE, answer


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("length", ["short", "long"])
def test_greedy_output_matches_a_colocated_run(pd_url, pd_client, colocated_client, model,
                                               length, kind, stream):
    topic = f"{length} {kind} {'streamed' if stream else 'whole'}"
    prompt = long_prompt(topic) if length == "long" else short_prompt(topic)
    expected = ask(colocated_client, model, kind, prompt, stream)
    num_pd = metric(pd_url, "kvmesh:pd_requests_total")
    got = ask(pd_client, model, kind, prompt, stream)
    assert (got.text, got.finish_reason, got.completion_tokens) == (
        expected.text, expected.finish_reason, expected.completion_tokens)
    assert expected.completion_tokens == MAX_TOKENS
    assert got.prompt_tokens == expected.prompt_tokens
    if length == "short":
        assert got.prompt_tokens < PD_MIN_TOKENS
        assert metric(pd_url, "kvmesh:pd_requests_total") == num_pd  # stayed colocated
    else:
        assert PD_MIN_TOKENS * 2 < got.prompt_tokens < MAX_MODEL_LEN - MAX_TOKENS
        assert metric(pd_url, "kvmesh:pd_requests_total") == num_pd + 1
        assert_handed_over(got)


def test_router_metrics_count_the_handoffs(pd_url):
    assert metric(pd_url, "kvmesh:pd_requests_total") >= 4  # the long prompts above
    assert metric(pd_url, "kvmesh:pd_transfer_bytes_total") > 0
    assert metric(pd_url, "kvmesh:pd_fallbacks_total") == 0


def test_tenants_do_not_share_handed_over_pages(pd_url, model):
    """Tenant beta's first request of alpha's prompt finds none of alpha's pages: the router
    sees nothing cached (it goes prefill -> decode again) and the decode worker reports only
    the pages beta's own prefill handed over, none already on its device. Alpha's repeat runs
    on the pages it left there."""
    alpha, beta = _client(pd_url, KEYS["alpha"]), _client(pd_url, KEYS["beta"])
    prompt = long_prompt("tenants")
    num_pd = metric(pd_url, "kvmesh:pd_requests_total")
    first_alpha = ask(alpha, model, "completion", prompt, False)
    assert_handed_over(first_alpha)
    first_beta = ask(beta, model, "completion", prompt, False)
    assert metric(pd_url, "kvmesh:pd_requests_total") == num_pd + 2
    assert_handed_over(first_beta)
    assert set(first_beta.cached_by_tier) <= HANDOFF_TIERS, first_beta
    again_alpha = ask(alpha, model, "completion", prompt, False)
    assert metric(pd_url, "kvmesh:pd_requests_total") == num_pd + 2  # cached: colocated
    assert again_alpha.cached_tokens >= again_alpha.prompt_tokens - PAGE_SIZE
    assert first_beta.text == first_alpha.text == again_alpha.text


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_sigkill_of_the_prefill_worker_mid_load_falls_back_to_colocated(
        pd_stack, pd_url, pd_client, colocated_client, model):
    prompts = [long_prompt(f"load {i}") for i in range(3)]
    expected = [ask(colocated_client, model, "completion", p, False).text for p in prompts]
    (prefill,) = pd_stack.child_pids("--role prefill")
    ticks = _cpu_ticks(prefill)
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(ask, pd_client, model, "completion", p, False) for p in prompts]
        deadline = time.monotonic() + 60
        while _cpu_ticks(prefill) < ticks + 5:  # 50 ms of CPU: it is computing a prompt
            assert time.monotonic() < deadline, "the prefill worker never started"
            time.sleep(0.01)
        os.kill(prefill, signal.SIGKILL)
        assert not all(f.done() for f in futures)
        answers = [f.result() for f in futures]
    assert [a.text for a in answers] == expected
    after = long_prompt("after the kill")
    assert ask(pd_client, model, "completion", after, False).text == (
        ask(colocated_client, model, "completion", after, False).text)
    assert metric(pd_url, "kvmesh:pd_fallbacks_total") >= 1
    assert pd_stack.proc.poll() is None  # the decode worker serves on
    deadline = time.monotonic() + 10  # the supervisor looks every 0.5 s
    while "prefill worker 0 exited with code -9; serving with 1 worker(s)" not in (
            pd_stack.stderr()):
        assert time.monotonic() < deadline, pd_stack.stderr()
        time.sleep(0.2)


def test_colocated_fallback_finds_no_pages_of_another_tenant(pd_url, model):
    """With the prefill worker gone, a third tenant's request of the prompt two tenants handed
    over (pages in the store and on the decode worker) computes all of it."""
    gamma = _client(pd_url, KEYS["gamma"])
    answer = ask(gamma, model, "completion", long_prompt("tenants"), False)
    assert answer.cached_tokens == 0 and not any(answer.cached_by_tier.values()), answer
    again = ask(gamma, model, "completion", long_prompt("tenants"), False)
    assert again.cached_tokens >= again.prompt_tokens - PAGE_SIZE
    assert again.text == answer.text


def _is_alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_losing_the_last_decode_worker_stops_the_stack(pd_stack):
    children = pd_stack.child_pids()
    assert len(children) == 3  # store, decode worker, router: the prefill worker is gone
    (decode,) = pd_stack.child_pids("--role decode")
    os.kill(decode, signal.SIGKILL)
    assert pd_stack.proc.wait(60) == 1
    assert "decode worker 0 exited with code -9; stopping the stack" in pd_stack.stderr()
    deadline = time.monotonic() + 10
    while any(_is_alive(pid) for pid in children):
        assert time.monotonic() < deadline, "a child outlived kvmesh serve"
        time.sleep(0.1)
