"""A poison request sent straight to a real worker over gRPC (no router in front) gets a clean
answer or INVALID_ARGUMENT; one that fails inside the engine step fails alone. Either way a
normal stream in flight on the same worker completes with transformers' greedy tokens and the
worker stays SERVING."""

from __future__ import annotations

import time

import grpc
import pytest
from engine_helpers import serve_loaded
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.service.client import WorkerClient

NORMAL_TEXT = "The history of the printing press begins with Johannes Gutenberg, who"
POISON_TEXT = "Write a haiku about the sea:"
NUM_NORMAL_TOKENS = 24


@pytest.fixture(scope="module", params=["sync", "aio"])
def worker(smollm2, request):
    """(handle, engine): a real worker on a random port (each gRPC server kind) and the Engine
    its loop owns."""
    config = WorkerConfig(model="smollm2", device="cpu", max_model_len=512,
                          kv_cache_bytes=128 << 20, max_num_seqs=8, grpc_server=request.param)
    handle, engine = serve_loaded(config, smollm2)
    yield handle, engine
    handle.stop()


@pytest.fixture(scope="module")
def stub(worker):
    with grpc.insecure_channel(worker[0].address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


def _generate(stub, prompt: list[int], request_id: str = "", **sampling):
    request = worker_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                         sampling=worker_pb2.SamplingParams(**sampling))
    return stub.Generate(request, timeout=120)


def _token_ids(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def _is_serving(worker) -> bool:
    with grpc.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = health.Check(health_pb2.HealthCheckRequest(service="kvmesh.v1.Worker"),
                                timeout=5)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _wait_idle(client: WorkerClient, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (stats := client.stats()).num_running or stats.num_waiting:
        assert time.monotonic() < deadline, f"worker still busy: {stats}"
        time.sleep(0.05)
    return stats


class NormalStream:
    """A greedy stream started before the poison and read to its end after it."""

    def __init__(self, worker, encode) -> None:
        self.client = WorkerClient(worker.address)
        self.prompt = encode(NORMAL_TEXT)
        params = SamplingParams(temperature=0.0, max_tokens=NUM_NORMAL_TOKENS, ignore_eos=True)
        self.outputs = self.client.generate(self.prompt, params, timeout=300)
        self.token_ids = list(next(self.outputs).token_ids)  # in flight from here

    def finish(self) -> tuple[list[int], str | None]:
        last = None
        for last in self.outputs:
            self.token_ids += last.token_ids
        self.client.close()
        return self.token_ids, last.finish_reason if last is not None else None


POISON_CASES = [
    ({"temperature": 1e-40}, "greedy"),  # sampled greedily: logits / 1e-40 would be inf
    ({"temperature": 1e-30, "top_p": 1e-30}, "greedy"),
    ({"temperature": 0.7, "top_k": 2**31 - 1, "seed": 3}, "sampled"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"temperature": float("inf")}, "temperature must be"),
    ({"temperature": 0.7, "top_p": float("nan")}, "top_p must be"),
    ({"temperature": 0.7, "top_p": float("-inf")}, "top_p must be"),
    ({"n": 2**32 - 1}, "n must be at most"),
    ({"max_tokens": 2**32 - 1}, "exceeds the context length"),
    ({"stop_token_ids": [7] * 1000}, "stop_token_ids holds 1000 ids"),
]
# The checks are the request parser's, shared by both servers: every case on the sync server,
# on the aio one a case of each outcome (its own path is the error mapping and the stream).
AIO_POISON_CASES = [POISON_CASES[i] for i in (0, 2, 3, 9)]


@pytest.mark.parametrize(
    ("worker", "sampling", "outcome"),
    [("sync", *case) for case in POISON_CASES] + [("aio", *case) for case in AIO_POISON_CASES],
    indirect=["worker"],
)
def test_poison_params_get_a_clean_answer_or_invalid_argument(worker, stub, encode, hf_greedy,
                                                              sampling, outcome):
    handle, _ = worker
    sampling = dict(sampling)  # popped below; the parameter is shared by both server kinds
    normal = NormalStream(handle, encode)
    prompt = encode(POISON_TEXT)
    if outcome in ("greedy", "sampled"):
        responses = list(_generate(stub, prompt, max_tokens=4, ignore_eos=True, **sampling))
        assert responses[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH
        assert len(_token_ids(responses)) == 4
        if outcome == "greedy":
            assert _token_ids(responses) == hf_greedy(prompt, 4)
    else:
        with pytest.raises(grpc.RpcError) as info:
            list(_generate(stub, prompt, max_tokens=sampling.pop("max_tokens", 4), **sampling))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert outcome in info.value.details()
    token_ids, finish = normal.finish()
    assert token_ids == hf_greedy(normal.prompt, NUM_NORMAL_TOKENS)
    assert finish == "length"
    assert _is_serving(handle)


def test_a_request_failing_inside_the_step_fails_alone(worker, stub, encode, hf_greedy):
    handle, engine = worker
    with WorkerClient(handle.address) as client:
        free = _wait_idle(client).num_pages_free
        append = engine._append

        def faulty(seq, token):  # the engine's ids are "<caller's id>#<n>"
            if seq.request_id.startswith("poison#") and seq.num_output_tokens == 1:
                raise RuntimeError("injected postprocessing fault")
            return append(seq, token)

        engine._append = faulty  # read by the engine-loop thread at its next call
        try:
            normal = NormalStream(handle, encode)
            with pytest.raises(grpc.RpcError) as info:
                list(_generate(stub, encode(POISON_TEXT), request_id="poison", max_tokens=8,
                               ignore_eos=True))
            token_ids, finish = normal.finish()
        finally:
            del engine._append
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "injected postprocessing fault" in info.value.details()
        assert ("kvmesh-failure-scope", "request") in tuple(info.value.trailing_metadata())
        assert token_ids == hf_greedy(normal.prompt, NUM_NORMAL_TOKENS)
        assert finish == "length"
        assert _is_serving(handle)
        assert _wait_idle(client).num_pages_free == free  # the poison's pages came back
        again = list(_generate(stub, encode(POISON_TEXT), max_tokens=3, ignore_eos=True))
        assert _token_ids(again) == hf_greedy(encode(POISON_TEXT), 3)
