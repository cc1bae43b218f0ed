"""The prefill half of a disaggregated request (`GenerateRequest.prefill_only`) on a real worker
(SmolLM2 on CPU, served over gRPC) with a real store: the first token comes at once, the finish
once every full page of the prompt is in the store (or, with `push_to`, in the decode worker's
host tier), and the decode worker then finds them there."""

from __future__ import annotations

import grpc
import pytest

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.errors import InvalidConfig
from kvmesh.workers.service.client import WorkerClient
from kvmesh.workers.service.server import serve_worker

PAGE_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _serve(smollm2, **config):
    from kvmesh.workers.engine.engine import Engine

    cfg = WorkerConfig(model="smollm2", device="cpu", max_model_len=512,
                       kv_cache_bytes=64 << 20, max_num_seqs=4, **config)
    return serve_worker(cfg, "127.0.0.1", 0, load_timeout=300,
                        engine_factory=lambda: Engine(cfg, loaded=smollm2))


@pytest.fixture(params=["sync", "aio"])
def pair(smollm2, store_server, request):
    """A prefill worker and a decode worker sharing one store (each gRPC server kind)."""
    target = f"127.0.0.1:{store_server.port}"
    prefill = _serve(smollm2, store=target, role="prefill", grpc_server=request.param)
    decode = _serve(smollm2, store=target, role="decode", host_tier_bytes=64 << 20,
                    grpc_server=request.param)
    yield prefill, decode
    decode.stop()
    prefill.stop()


def _prompt(encode) -> list[int]:
    text = ("A lighthouse keeper kept a log of every ship that passed the cape, the weather, and "
            "the colour of the sea at dawn. ") * 5
    return encode(text)


def test_prefill_only_answers_the_first_token_then_hands_the_pages_over(pair, encode,
                                                                        hf_greedy):
    prefill, decode = pair
    prompt = _prompt(encode)
    assert len(prompt) > 4 * PAGE_SIZE
    expected = hf_greedy(prompt, 8)
    with WorkerClient(prefill.address) as client:
        assert client.stats().role == "prefill"
        outputs = list(client.generate(prompt, GREEDY, tenant_salt="t1", prefill_only=True,
                                       timeout=120))
    # the first token alone (no finish), then the finish with the handoff's report
    assert [o.token_ids for o in outputs] == [expected[:1], []]
    assert outputs[0].finish_reason is None and outputs[1].finish_reason == "length"
    usage = outputs[1].usage
    assert usage.completion_tokens == 1
    assert usage.pages_handed_off == len(prompt) // PAGE_SIZE
    assert usage.handoff_wait_s >= 0
    # the decode worker goes on from prompt + first token with the prompt's pages from the store
    with WorkerClient(decode.address) as client:
        assert client.stats().role == "decode"
        rest = list(client.generate(prompt + expected[:1], SamplingParams(
            temperature=0.0, max_tokens=7, ignore_eos=True), tenant_salt="t1", timeout=120))
    assert [t for o in rest for t in o.token_ids] == expected[1:]
    by_tier = rest[-1].usage.cached_tokens_by_tier
    assert by_tier.get("store", 0) == len(prompt) // PAGE_SIZE * PAGE_SIZE
    # another tenant's lookup of the same prompt finds none of those pages
    with WorkerClient(decode.address) as client:
        other = list(client.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1),
                                     tenant_salt="t2", timeout=120))
    assert other[-1].usage.cached_tokens == 0


def _push_prompt(encode, topic: str) -> list[int]:
    return encode(f"Notes on {topic}: " + "the tide came in, the tide went out, and the keeper "
                  "wrote it all down in the log by the lamp. " * 4)


def test_pushed_pages_land_in_the_decode_workers_host_tier(pair, encode, hf_greedy):
    prefill, decode = pair
    prompt = _push_prompt(encode, "pushing")
    expected = hf_greedy(prompt, 4)
    with WorkerClient(prefill.address) as client:
        outputs = list(client.generate(prompt, GREEDY, tenant_salt="t1", prefill_only=True,
                                       push_to=decode.address, timeout=120))
    assert outputs[0].token_ids == expected[:1]
    assert outputs[1].usage.pages_handed_off == len(prompt) // PAGE_SIZE
    with WorkerClient(decode.address) as client:
        rest = list(client.generate(prompt + expected[:1], SamplingParams(
            temperature=0.0, max_tokens=3, ignore_eos=True), tenant_salt="t1", timeout=120))
    assert [t for o in rest for t in o.token_ids] == expected[1:]
    assert rest[-1].usage.cached_tokens_by_tier == {"cpu": len(prompt) // PAGE_SIZE * PAGE_SIZE}


def test_a_push_the_target_cannot_take_goes_through_the_store(pair, encode):
    """The prefill worker has no host tier: pushing to it fails (FAILED_PRECONDITION), and the
    handoff waits for the store instead."""
    prefill, _ = pair
    prompt = _push_prompt(encode, "refused")
    with WorkerClient(prefill.address) as client:
        outputs = list(client.generate(prompt, GREEDY, tenant_salt="t1", prefill_only=True,
                                       push_to=prefill.address, timeout=120))
    assert outputs[1].usage.pages_handed_off == len(prompt) // PAGE_SIZE


def _push(address: str, prompt: list[int], pages: list[bytes], salt: str = "t1",
          first_page: int = 0) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = worker_pb2_grpc.WorkerStub(channel).PushPages(worker_pb2.PushPagesRequest(
            tenant_salt=salt, prompt_token_ids=prompt, first_page=first_page, pages=pages),
            timeout=60)
    return reply.num_pages


def test_push_pages_keeps_only_the_leading_run_that_checks_out(pair, encode):
    prefill, decode = pair
    prompt = _push_prompt(encode, "checked")
    from kvmesh.workers.engine.page_exchange import export_prompt_pages

    with WorkerClient(prefill.address) as client:  # the prefill worker's device holds them
        list(client.generate(prompt, GREEDY, tenant_salt="t1", prefill_only=True, timeout=120))
    pages = prefill._loop.call(lambda e: export_prompt_pages(e, "t1", prompt), 30)
    assert len(pages) == len(prompt) // PAGE_SIZE
    bad = bytearray(pages[2])
    bad[-1] ^= 0xFF  # the payload's last byte: only the checksum can tell
    assert _push(decode.address, prompt, [pages[0], pages[1], bytes(bad), pages[3]]) == 2
    assert _push(decode.address, prompt, pages, salt="another tenant") == 0
    assert _push(decode.address, prompt, pages[1:3], first_page=1) == 2
    with pytest.raises(grpc.RpcError) as info:  # more pages than the prompt has
        _push(decode.address, prompt, pages, first_page=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_worker_without_a_host_tier_refuses_pushed_pages(pair, encode):
    prefill, _ = pair
    with pytest.raises(grpc.RpcError) as info:
        _push(prefill.address, _push_prompt(encode, "nowhere"), [b"x" * 64])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "host tier" in info.value.details()


def test_prefill_only_takes_one_completion(pair, encode):
    prefill, _ = pair
    with grpc.insecure_channel(prefill.address) as channel:
        request = worker_pb2.GenerateRequest(
            request_id="n2", prompt_token_ids=encode("Hello there"), prefill_only=True,
            sampling=worker_pb2.SamplingParams(max_tokens=4, n=2))
        with pytest.raises(grpc.RpcError) as info:
            list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefill_only" in info.value.details()


def test_prefill_only_on_a_worker_without_a_store_is_a_failed_precondition(smollm2, encode):
    worker = _serve(smollm2)
    try:
        with grpc.insecure_channel(worker.address) as channel:
            request = worker_pb2.GenerateRequest(
                request_id="no-store", prompt_token_ids=encode("Hello there"), prefill_only=True,
                sampling=worker_pb2.SamplingParams(max_tokens=4))
            with pytest.raises(grpc.RpcError) as info:
                list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=30))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "store" in info.value.details()
    finally:
        worker.stop()


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_prefill_or_decode_worker_needs_a_store(role):
    with pytest.raises(InvalidConfig, match="store"):
        WorkerConfig(role=role)


def test_an_unknown_role_is_refused():
    with pytest.raises(InvalidConfig, match="role"):
        WorkerConfig(role="sometimes", store="127.0.0.1:1")
