"""`kvmesh serve --router-processes 2`: the official `openai` client, streamed and not, over
many connections to a real stack (store, one SmolLM2 worker, a router of two serving processes
on one port). Each response names the process that served it (X-Kvmesh-Router-Process): both
must have served completions, with the same greedy text, and /metrics from either process must
count every completion of both. Last, SIGTERM to the router stops both of its processes (exit
0). Killing one process and a crash loop are in tests/router/test_router_processes.py."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from serve_stack import Stack

from kvmesh.deploy.errors import RayConfigError
from kvmesh.deploy.ray_config import RayDeployConfig
from kvmesh.router.processes import PROCESS_HEADER

PROMPTS = ("The capital of France is", "Count with me: one, two,")
MAX_TOKENS = 6
MAX_REQUESTS = 48  # until both processes served one; 2**-47 odds that the kernel hashes all
# the connections to one process


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("serve-processes") / "data", "--workers", "1",
              "--router-processes", "2")
    try:
        s.wait_ready(300)
        yield s
    finally:
        s.close()


def _complete(port: int, i: int) -> tuple[str, str, str, int]:
    """(process, prompt, text, completion tokens) of request i on a new connection: even i
    streamed, odd i not."""
    prompt = PROMPTS[i % len(PROMPTS)]
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                       timeout=120) as client:
        model = client.models.list().data[0].id
        if i % 2 == 0:
            stream = client.completions.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True})
            process = stream.response.headers[PROCESS_HEADER]
            chunks = list(stream)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            usage = next(c.usage for c in chunks if c.usage is not None)
            return process, prompt, text, usage.completion_tokens
        raw = client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        response = raw.parse()
        assert response.usage is not None
        return (raw.headers[PROCESS_HEADER], prompt, response.choices[0].text,
                response.usage.completion_tokens)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def test_one_serving_line(stack):
    assert stack.lines == [f"kvmesh serving on http://127.0.0.1:{stack.port}\n"]


def test_both_processes_serve_completions_and_metrics_count_all_of_them(stack):
    results = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results += pool.map(lambda i: _complete(stack.port, i), range(8))
    # until each process served a streamed and a plain one (request i is streamed if i is even)
    while len({(r[0], i % 2) for i, r in enumerate(results)}) < 4:
        assert len(results) < MAX_REQUESTS, results
        results.append(_complete(stack.port, len(results)))
    texts: dict[str, set[str]] = {}
    for _, prompt, text, num_tokens in results:
        assert num_tokens == MAX_TOKENS
        texts.setdefault(prompt, set()).add(text)
    # greedy: one text per prompt, whichever process, streamed or not
    assert all(len(seen) == 1 and next(iter(seen)) for seen in texts.values()), texts

    scraped: dict[str, str] = {}
    for _ in range(64):  # each scrape on a new connection: both processes answer at last
        response = httpx.get(f"http://127.0.0.1:{stack.port}/metrics", timeout=30)
        scraped[response.headers[PROCESS_HEADER]] = response.text
        if len(scraped) == 2:
            break
    assert set(scraped) == {"0", "1"}
    for text in scraped.values():  # every process's counts, merged, from either one
        assert _metric(text, "kvmesh:request_success_total") == len(results)
        assert _metric(text, "kvmesh:generation_tokens_total") == MAX_TOKENS * len(results)
        assert _metric(text, "kvmesh:time_to_first_token_seconds_count") == len(results)
        assert _metric(text, "kvmesh:router_requests_inflight") == 0  # live processes summed


def test_sigterm_stops_both_router_processes(stack):
    router = next(pid for pid in stack.child_pids(" router "))
    processes = _children(router)
    assert len(processes) == 2
    os.kill(router, signal.SIGTERM)  # kvmesh serve sees its router exit and stops the stack
    assert stack.proc.wait(60) == 1
    assert "router exited with code 0; stopping the stack" in stack.stderr()
    assert not any(Path(f"/proc/{pid}").exists() for pid in [router, *processes])
    assert "kvmesh router listening" not in stack.stderr()  # the line came once, to serve


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def test_ray_deploy_passes_router_processes_on():
    assert "--processes" not in RayDeployConfig().router_argv(["w:1"], "s:1")  # router's default
    argv = RayDeployConfig(router_processes="3").router_argv(["w:1"], "s:1")
    assert argv[argv.index("--processes") + 1] == "3"
    with pytest.raises(RayConfigError, match="--router-processes"):
        RayDeployConfig(router_processes="0")
