"""`kvmesh serve` end to end: the official `openai` client against the real stack (store, two
SmolLM2 workers, router) started as a subprocess on a free port. One stack for the module; the
last tests kill a worker (the stack keeps serving) and then stop it with SIGINT, checking that
no part outlives it."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from serve_stack import MAX_MODEL_LEN, Stack

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.client.store_client import Unauthenticated
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.service.client import WorkerClient, WorkerError

KEY_A, KEY_B = "key-tenant-a", "key-tenant-b"
LONG_PROMPT = " ".join(
    f"Item {i}: the {w} fox jumps over the lazy dog near the river bank."
    for i, w in enumerate(["quick", "brown", "red", "slow", "grey", "young", "old", "tired"])
)


def _pids_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains `marker` (a unique temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "api_keys"
    key_file.write_text(f"# one a line\n{KEY_A}\n")  # a bare key is its own tenant
    s = Stack(tmp_path_factory.mktemp("serve") / "data", "--workers", "2",
              "--api-key-file", str(key_file), env={"KVMESH_SERVE_API_KEYS": KEY_B})
    try:
        line = s.wait_ready(300)
        assert line == f"kvmesh serving on http://127.0.0.1:{s.port}\n"
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def base_url(stack):
    return f"http://127.0.0.1:{stack.port}/v1"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=KEY_A, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_chat_completion(client, model):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=4, temperature=0,
    )
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0
    assert 0 < response.usage.completion_tokens <= 4


def test_chat_streaming_matches_non_streaming(client, model):
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=6,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_stream_and_not(client, model):
    kwargs = dict(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
    full = client.completions.create(**kwargs)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs,
                                                                            stream=True)
                       if c.choices)
    assert streamed == full.choices[0].text


def test_n2_returns_two_choices(client, model):
    response = client.completions.create(model=model, prompt="The sky is", max_tokens=4,
                                         temperature=0, n=2)
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert response.choices[0].text == response.choices[1].text  # greedy: identical
    assert response.usage.completion_tokens == 8  # both completions counted


def test_stop_string_cuts_the_text(client, model):
    kwargs = dict(model=model, prompt="Count: one, two, three,", max_tokens=10, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_repeated_long_prompt_reports_cached_tokens(client, model):
    kwargs = dict(model=model, prompt=LONG_PROMPT + " Summary:", max_tokens=2, temperature=0)
    first = client.completions.create(**kwargs)
    assert first.usage.prompt_tokens >= 64
    second = client.completions.create(**kwargs)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0
    assert cached >= (second.usage.prompt_tokens - 1) // 16 * 16 - 16
    assert second.choices[0].text == first.choices[0].text


def test_second_tenant_gets_no_cached_tokens_from_the_first(base_url, model):
    prompt = LONG_PROMPT.replace("fox", "cat") + " Tenants:"
    a = openai.OpenAI(base_url=base_url, api_key=KEY_A, max_retries=0, timeout=120)
    b = openai.OpenAI(base_url=base_url, api_key=KEY_B, max_retries=0, timeout=120)
    kwargs = dict(model=model, prompt=prompt, max_tokens=2, temperature=0)
    a.completions.create(**kwargs)
    first_b = b.completions.create(**kwargs)
    assert first_b.usage.prompt_tokens_details.cached_tokens == 0
    again_b = b.completions.create(**kwargs)  # B's own pages are reused
    assert again_b.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"model": "m", "prompt": "hi", ', 400),  # malformed JSON
        ({"model": "no-such-model", "prompt": "hi", "max_tokens": 2}, 404),
        ({"prompt": "hi", "max_tokens": -1}, 400),
        ({"prompt": "word " * (MAX_MODEL_LEN + 10), "max_tokens": 2}, 400),
    ],
    ids=["malformed-json", "unknown-model", "negative-max-tokens", "too-long-prompt"],
)
def test_bad_request_gets_4xx_error_body_and_server_keeps_serving(
    base_url, client, model, body, status
):
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        response = httpx.post(f"{base_url}/completions", json={"model": model, **body},
                              headers=headers, timeout=60)
    else:
        response = httpx.post(f"{base_url}/completions", content=body, headers=headers,
                              timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    ok = client.completions.create(model=model, prompt="Hello", max_tokens=1, temperature=0)
    assert ok.usage.completion_tokens == 1


def test_missing_or_unknown_api_key_is_401(base_url, model):
    for key in ("not-a-key",):
        bad = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=model, prompt="hi", max_tokens=1)
    response = httpx.post(f"{base_url}/completions", json={"model": model, "prompt": "hi"},
                          timeout=60)
    assert response.status_code == 401
    assert response.json()["error"]["message"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _router_flag(stack, flag: str) -> list[str]:
    """Addresses the router was started with (`--store A`, `--worker B ...`)."""
    (router,) = [pid for pid in _children_of(stack.proc.pid) if " router " in _cmdline(pid)]
    return re.findall(rf"{flag} (\S+)", _cmdline(router))


def test_internal_ports_refuse_calls_without_the_internal_token(stack, model):
    """What a local user could do with no token: ask the store what is cached (another
    tenant's prefix included), or generate on a worker straight away."""
    (store,) = _router_flag(stack, "--store")
    workers = _router_flag(stack, "--worker")
    assert len(workers) == 2
    ns = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    with StoreClient(store) as anonymous, pytest.raises(Unauthenticated):
        anonymous.lookup(list(range(32)), ns)
    with StoreClient(store, token="guessed-token") as guesser, pytest.raises(Unauthenticated):
        guesser.lookup(list(range(32)), ns)
    for address in workers:
        with WorkerClient(address) as anonymous, pytest.raises(WorkerError, match="UNAUTH"):
            list(anonymous.generate([1, 2, 3], SamplingParams(max_tokens=1), timeout=30))


def test_no_secret_is_on_any_command_line(stack):
    children = _children_of(stack.proc.pid)
    assert len(children) == 4  # store, two workers, router
    for pid in [stack.proc.pid, *children]:
        argv = _cmdline(pid)
        for secret in (KEY_A, KEY_B, "--token", "--secret", "--worker-token", "--store-token"):
            assert secret not in argv, (secret, argv)
    secret_file = stack.data_dir / "tenant_secret"
    assert secret_file.stat().st_mode & 0o077 == 0 and len(secret_file.read_text().strip()) >= 32


def test_cpu_workers_split_the_cores(stack):
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # two CPU workers
    workers = [pid for pid in _children_of(stack.proc.pid) if " worker " in _cmdline(pid)]
    assert len(workers) == 2
    for pid in workers:
        assert f"--torch-threads {share} " in _cmdline(pid) + " "


def test_killed_worker_is_left_out_and_requests_still_succeed(stack, client, model):
    workers = [pid for pid in _children_of(stack.proc.pid) if " worker " in _cmdline(pid)]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    for i in range(3):
        response = client.completions.create(model=model, prompt=f"Fact {i}:", max_tokens=2,
                                             temperature=0)
        assert response.usage.completion_tokens == 2
    assert stack.proc.poll() is None  # the stack kept serving
    # the supervisor looks at its children every 0.5 s: the requests may have been faster
    deadline = time.monotonic() + 10
    while "exited with code -9; serving with 1 worker(s)" not in stack.stderr():
        assert time.monotonic() < deadline, stack.stderr()
        time.sleep(0.2)


def test_sigint_stops_every_part(stack):
    all_children = _children_of(stack.proc.pid)
    assert len(all_children) == 3, all_children  # store, the live worker, router
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(60) == 0, stack.stderr()
    deadline = time.monotonic() + 10
    while any(_is_alive(pid) for pid in all_children):
        assert time.monotonic() < deadline, "a child outlived kvmesh serve"
        time.sleep(0.1)


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_part_failing_at_start_stops_the_others(tmp_path):
    """A worker that cannot start (bad flag) fails the stack with a clear message; the store
    that had started is stopped too."""
    data_dir = tmp_path / "broken"
    stack = Stack(data_dir, "--worker-arg=--page-size=12")
    try:
        assert stack.proc.wait(120) == 1
        assert stack.lines == []
        stderr = stack.stderr()
        assert "worker 0 exited with code 2 before it was ready" in stderr
        assert "page_size must be a power of two" in stderr
        assert _pids_mentioning(str(data_dir)) == []
    finally:
        stack.close()

