"""The Worker gRPC service with the real SmolLM2 engine on a random loopback port.

One worker for the module. Greedy references come from transformers' own `generate` on the same
weights in fp32 (tests/workers/conftest.py).
"""

from __future__ import annotations

import queue
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.errors import WorkerNotReady
from kvmesh.workers.service.client import WorkerClient, WorkerError
from kvmesh.workers.service.server import serve_worker

MAX_MODEL_LEN = 512
NUM_NEW_TOKENS = 12
PROMPT_TEXT = (
    "The history of the printing press begins with Johannes Gutenberg, who around 1440 built a "
    "press with movable metal type in Mainz. Explain in two sentences why it mattered:"
)


@pytest.fixture(scope="module", params=["sync", "aio"])
def worker(smollm2, request):
    """A real worker on a random port, on each gRPC server kind; its Engine shares the session's
    loaded SmolLM2."""
    from kvmesh.workers.engine.engine import Engine

    config = WorkerConfig(model="smollm2", device="cpu", max_model_len=MAX_MODEL_LEN,
                          kv_cache_bytes=256 << 20, max_num_seqs=8, grpc_server=request.param)
    handle = serve_worker(config, "127.0.0.1", 0, load_timeout=300,
                          engine_factory=lambda: Engine(config, loaded=smollm2))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(worker):
    with WorkerClient(worker.address) as c:
        yield c


@pytest.fixture(scope="module")
def hf(smollm2, hf_greedy):
    """(tokenizer, greedy(prompt_ids, num_new_tokens) -> new token ids from transformers)."""
    return smollm2.tokenizer, hf_greedy


@pytest.fixture(scope="module")
def prompt_ids(encode):
    return encode(PROMPT_TEXT)


def _greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def _collect(outputs) -> dict[int, dict]:
    """Per completion index: token ids, text, number of messages, finish reason, usage."""
    by_index: dict[int, dict] = {}
    for out in outputs:
        entry = by_index.setdefault(out.index, {"ids": [], "text": "", "messages": 0,
                                                "finish": None, "usage": None})
        assert entry["finish"] is None, "output after the completion finished"
        entry["ids"] += out.token_ids
        entry["text"] += out.text
        entry["messages"] += 1
        entry["finish"] = out.finish_reason
        entry["usage"] = out.usage
        assert (out.finish_reason is None) == (out.usage is None)
    return by_index


def test_health_is_serving(worker):
    with grpc.insecure_channel(worker.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvmesh.v1.Worker"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert {"kvmesh.v1.Worker", "grpc.health.v1.Health"} <= set(services)


def test_model_that_fails_to_load_raises_and_releases_the_port():
    config = WorkerConfig(model="/nonexistent/model.gguf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WorkerNotReady, match="/nonexistent/model.gguf does not exist"):
        serve_worker(config, "127.0.0.1", port)
    with socket.socket() as s:  # the failed worker's server is gone: the port binds again
        s.bind(("127.0.0.1", port))


def test_generate_streams_transformers_greedy_tokens(client, hf, prompt_ids):
    tokenizer, greedy = hf
    expected = greedy(prompt_ids, NUM_NEW_TOKENS)
    result = _collect(client.generate(prompt_ids, _greedy(NUM_NEW_TOKENS), request_id="r1",
                                      timeout=120))
    assert list(result) == [0]
    got = result[0]
    assert got["ids"] == expected
    assert got["messages"] >= 2  # streamed, not one final message
    assert got["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert got["finish"] == "length"
    assert got["usage"].prompt_tokens == len(prompt_ids)
    assert got["usage"].completion_tokens == NUM_NEW_TOKENS

    # The same prompt again: its full pages come from the worker's page cache, same tokens.
    again = _collect(client.generate(prompt_ids, _greedy(NUM_NEW_TOKENS), timeout=120))[0]
    assert again["ids"] == expected
    usage = again["usage"]
    page_size = client.stats().page_size
    assert usage.cached_tokens > 0
    assert usage.cached_tokens % page_size == 0
    assert usage.cached_tokens >= (len(prompt_ids) - 1) // page_size * page_size
    assert usage.cached_tokens_by_tier == {"device": usage.cached_tokens}


def test_n2_gives_two_completions_with_their_own_usage(client, hf, prompt_ids):
    expected = hf[1](prompt_ids, 6)
    result = _collect(client.generate(prompt_ids, _greedy(6, n=2), timeout=120))
    assert sorted(result) == [0, 1]
    for index in (0, 1):
        assert result[index]["ids"] == expected
        assert result[index]["finish"] == "length"
        assert result[index]["usage"].completion_tokens == 6


def test_stop_token_id_finishes_with_stop(client, hf, prompt_ids):
    expected = hf[1](prompt_ids, 6)
    stop_at = expected[3]
    first = expected.index(stop_at)
    got = _collect(client.generate(prompt_ids, _greedy(6, stop_token_ids=[stop_at]),
                                   timeout=120))[0]
    assert got["finish"] == "stop"
    assert got["ids"] == expected[: first + 1]


def _wait_idle(client: WorkerClient, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        assert time.monotonic() < deadline, f"worker still busy: {stats}"
        time.sleep(0.05)


def test_cancel_aborts_request_and_frees_its_pages(client, prompt_ids):
    before = _wait_idle(client)
    # A prompt no other test uses, long enough to hold pages of its own while decoding.
    prompt = [(t + 7) % 40000 + 100 for t in prompt_ids] * 2
    outputs = client.generate(prompt, _greedy(MAX_MODEL_LEN - len(prompt) - 1), timeout=300)
    first = next(outputs)
    assert first.token_ids
    busy = client.stats()
    assert busy.num_running + busy.num_waiting == 1
    assert busy.num_pages_free < before.num_pages_free
    outputs.close()  # cancels the RPC; the worker aborts the request
    after = _wait_idle(client)
    assert after.num_pages_free == before.num_pages_free


def test_client_disconnect_aborts_request(worker, client, prompt_ids):
    before = _wait_idle(client)
    other = WorkerClient(worker.address)
    outputs = other.generate(list(reversed(prompt_ids)), _greedy(300), timeout=300)
    next(outputs)
    other.close()  # the connection goes away mid-stream
    after = _wait_idle(client)
    assert after.num_pages_free == before.num_pages_free


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([], {"max_tokens": 4}, "prompt_token_ids must not be empty"),
        ([5] * MAX_MODEL_LEN, {"max_tokens": 1}, "context length"),
        ([5] * 10, {"max_tokens": MAX_MODEL_LEN}, "exceeds the context length"),
        ([5, 10**9], {"max_tokens": 4}, "outside the vocabulary"),
        ([5] * 10, {"max_tokens": 4, "temperature": -1.0}, "temperature"),
        ([5] * 10, {"max_tokens": 4, "temperature": float("nan")}, "temperature"),
        ([5] * 10, {"max_tokens": 4, "top_p": 1.5}, "top_p"),
        ([5] * 10, {"max_tokens": 4, "top_k": -3}, "top_k"),
        ([5] * 10, {"max_tokens": 4, "n": 1000}, "n must be"),
        ([5] * 10, {"max_tokens": 4, "stop": [""]}, "stop"),
        ([5] * 10, {"max_tokens": 4, "stop_token_ids": [10**8]}, "stop token id"),
    ],
)
def test_bad_request_is_invalid_argument(worker, prompt, sampling, message):
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = worker_pb2.GenerateRequest(
            request_id="bad", prompt_token_ids=prompt,
            sampling=worker_pb2.SamplingParams(**sampling),
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_client_raises_typed_error_and_worker_keeps_serving(client, prompt_ids):
    with pytest.raises(WorkerError) as info:
        list(client.generate([], _greedy(4), timeout=30))
    assert info.value.is_invalid_request
    got = _collect(client.generate(prompt_ids[:5], _greedy(2), timeout=60))[0]
    assert len(got["ids"]) == 2


def test_n0_means_one_completion(worker, prompt_ids):
    with grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = worker_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids[:8],
            sampling=worker_pb2.SamplingParams(max_tokens=3, n=0, ignore_eos=True),
        )
        responses = list(stub.Generate(request, timeout=60))
    assert {r.index for r in responses} == {0}
    assert sum(len(r.token_ids) for r in responses) == 3
    assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert responses[-1].request_id  # the worker names a request that came without an id


def _subscribe(client: WorkerClient):
    """Collect KvEvents on a thread into a queue; returns (queue, stop)."""
    events: queue.Queue = queue.Queue()
    stream = client.kv_events()

    def pump() -> None:
        for event in stream:
            events.put(event)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()

    def stop() -> None:
        stream.close()
        thread.join(10)

    return events, stop


def test_kv_events_snapshot_then_live_events_with_increasing_seq(client, prompt_ids):
    stats = client.stats()
    namespace = stats.namespace
    # Everything generated so far is in the snapshot: at least the first prompt's full pages.
    events, stop = _subscribe(client)
    try:
        first = events.get(timeout=10)
        assert (first.seq, first.kind, first.epoch) == (1, "cleared", stats.epoch)
        seen: list = [first]
        held: set[bytes] = set()
        prompt_keys = namespace.page_keys(prompt_ids)
        deadline = time.monotonic() + 10
        while not set(prompt_keys) <= held:
            assert time.monotonic() < deadline, "snapshot lacks the first prompt's pages"
            event = events.get(timeout=10)
            seen.append(event)
            if event.kind == "stored":
                held.update(event.keys)
        # A new prompt: its pages arrive as live "stored" events with the keys cachestore.keys
        # computes from the worker's namespace.
        new_prompt = [(t * 3) % 30000 + 50 for t in prompt_ids[:40]]
        list(client.generate(new_prompt, _greedy(2), timeout=60))
        new_keys = namespace.page_keys(new_prompt)
        assert len(new_keys) == 40 // stats.page_size
        deadline = time.monotonic() + 10
        while not set(new_keys) <= held:
            assert time.monotonic() < deadline, "no stored events for the new prompt's pages"
            event = events.get(timeout=10)
            seen.append(event)
            if event.kind == "stored":
                assert event.tier == "device"
                held.update(event.keys)
            elif event.kind == "removed":
                held.difference_update(event.keys)
    finally:
        stop()
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert client.stats().kv_events_seq >= seen[-1].seq


def test_tenant_salt_changes_the_page_keys_the_router_computes(client, prompt_ids):
    namespace = client.stats().namespace
    prompt = [(t * 5) % 20000 + 70 for t in prompt_ids[:32]]
    events, stop = _subscribe(client)
    try:
        list(client.generate(prompt, _greedy(1), tenant_salt="tenant-x", timeout=60))
        salted = namespace.with_salt("tenant-x").page_keys(prompt)
        assert len(salted) == 2 and set(salted).isdisjoint(namespace.page_keys(prompt))
        held: set[bytes] = set()
        deadline = time.monotonic() + 10
        while not set(salted) <= held:
            assert time.monotonic() < deadline, "no stored events with the tenant's keys"
            event = events.get(timeout=10)
            if event.kind == "stored":
                held.update(event.keys)
        assert set(namespace.page_keys(prompt)).isdisjoint(held)
    finally:
        stop()


def test_stats_report_model_limits_and_prefix_counters(client, prompt_ids):
    stats = client.stats()
    assert stats.model
    assert stats.page_size == 16
    assert stats.max_model_len == MAX_MODEL_LEN
    assert stats.num_pages_total > 0
    assert 0 < stats.num_pages_free <= stats.num_pages_total
    assert stats.epoch > 0
    ns = stats.namespace
    assert (ns.num_layers, ns.num_kv_heads, ns.head_dim) == (30, 3, 64)
    assert ns.dtype_name == "float32" and ns.salt == "" and ns.page_size == 16
    list(client.generate(prompt_ids, _greedy(1), timeout=60))
    later = client.stats()
    assert later.prefix_queries > stats.prefix_queries
    assert later.prefix_hits.get("device", 0) > stats.prefix_hits.get("device", 0)
