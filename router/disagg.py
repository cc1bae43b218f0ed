"""Prefill/decode disaggregation: a long prompt's prefill runs on a prefill worker, which hands
its KV to the decode worker through the store.

1. `wants_prefill_worker`: the decode worker is chosen as for any request; when it would still
   compute at least `pd_min_tokens` of the prompt (neither its own tiers nor the store hold
   them), the prefill goes elsewhere.
2. `PrefillPhase`: a prefill worker (least cost among prefill workers, cache-aware) gets the
   request with `prefill_only`: it answers with the first token at once, which goes to the
   client, and finishes once every full page of the prompt is in the store (`pages_handed_off`)
   or, with `pd_transfer` "push", in the decode worker's host tier (`push_to`).
3. The router then runs the request on the decode worker as it would move a stream to another
   worker: the prompt plus the first token, the first token counted as output
   (`Router.run`); the decode worker loads the prompt's pages from the store and computes at
   most the last partial page.

Any failure of the prefill phase (no prefill worker, an error, `pd_prefill_timeout_s`) makes
the request colocated: the decode worker goes on from whatever the phase produced (nothing, or
the first token). Requests that could not move between workers (n > 1, stop strings) and
requests of one token stay colocated.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Protocol

import grpc

from kvmesh.router.config import RouterConfig
from kvmesh.router.errors import NoWorkerAvailable
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.requests import Chunk, Prepared
from kvmesh.router.routing.policy import Decision
from kvmesh.router.routing.pool import WorkerHandle, WorkerPool
from kvmesh.v1 import worker_pb2


class RouterParts(Protocol):
    """What a prefill phase uses of the router (`service.Router`)."""

    config: RouterConfig
    pool: WorkerPool
    metrics: RouterMetrics

    def route(self, prompt_ids: Sequence[int], salt: str, exclude: Sequence[str] = (),
              num_store_pages: int = 0, part: str = "decode"
              ) -> tuple[WorkerHandle, Decision]: ...

    def generate_request(self, prep: Prepared, sent: Sequence[int] = ()
                         ) -> worker_pb2.GenerateRequest: ...


def wants_prefill_worker(config: RouterConfig, prep: Prepared, decision: Decision,
                         num_store_pages: int, page_size: int) -> bool:
    """Whether `prep`'s prefill should run on a prefill worker, the decode worker having been
    chosen with `decision` (`num_store_pages`: prompt pages the store holds)."""
    s = prep.parsed.sampling
    if not config.prefill_workers or s.n != 1 or s.stop or s.max_tokens == 1:
        return False
    num_cached = max(decision.num_cached_pages, num_store_pages) * page_size
    return len(prep.prompt_ids) - num_cached >= config.pd_min_tokens


class PrefillPhase:
    """Runs one request's prefill on a prefill worker (`run`, an async generator of the chunks
    for the client). Afterwards: `sent` / `text`, the tokens and text the client got; `is_done`
    when the first token ended the request; `first_token_at` (monotonic); `fallback`, why the
    request runs colocated (None when the handoff happened)."""

    def __init__(self, router: RouterParts, prep: Prepared, num_store_pages: int,
                 decode: WorkerHandle,
                 to_chunk: Callable[[worker_pb2.GenerateResponse, str], Chunk]) -> None:
        self._router, self._prep, self._decode = router, prep, decode
        self._num_store_pages = num_store_pages
        self._to_chunk = to_chunk
        self.sent: list[int] = []
        self.text = ""
        self.is_done = False
        self.first_token_at: float | None = None
        self.fallback: str | None = None
        self.num_pages_handed_off = 0

    @property
    def _pool(self) -> WorkerPool:
        return self._router.pool

    @property
    def _metrics(self) -> RouterMetrics:
        return self._router.metrics

    async def run(self, started: float) -> AsyncGenerator[Chunk, None]:
        """The prefill worker's first token as a chunk (and its finish, if the token ended the
        request). `started`: when the request arrived (for the time to first token)."""
        router, prep = self._router, self._prep
        try:
            handle, _ = router.route(prep.prompt_ids, prep.salt, part="prefill",
                                     num_store_pages=self._num_store_pages)
        except NoWorkerAvailable:
            self._fall_back("no_prefill_worker")
            return
        self._metrics.pd_requests.inc()
        request = router.generate_request(prep)
        request.prefill_only = True
        request.sampling.max_tokens = 1
        if router.config.pd_transfer == "push":
            request.push_to = self._decode.worker_id
        num_prompt = len(prep.prompt_ids)
        handle.num_inflight += 1
        handle.num_queued_tokens += num_prompt
        queued = True
        call = self._pool.generate(handle, request)
        try:
            async with asyncio.timeout(router.config.pd_prefill_timeout_s):
                async for response in call:
                    if queued:
                        queued = False
                        handle.num_queued_tokens -= num_prompt
                    if response.token_ids:
                        self._first_token(response, handle, started)
                        yield Chunk(0, response.text, list(response.token_ids), handle.worker_id)
                    if response.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED:
                        chunk = self._finish(response, handle)
                        if chunk is not None:
                            yield chunk
            self._pool.record_success(handle)
        except TimeoutError:
            self._fall_back("prefill_timeout")
        except grpc.aio.AioRpcError as exc:
            self._pool.record_failure(handle, exc.code())
            self._fall_back("prefill_failed")
        finally:
            call.cancel()
            handle.num_inflight -= 1
            if queued:
                handle.num_queued_tokens -= num_prompt

    def _first_token(self, response: worker_pb2.GenerateResponse, handle: WorkerHandle,
                     started: float) -> None:
        self.first_token_at = time.monotonic()
        self._metrics.ttft.observe(self.first_token_at - started)
        self._metrics.generation_tokens.inc(len(response.token_ids))
        self.sent, self.text = list(response.token_ids), response.text

    def _finish(self, response: worker_pb2.GenerateResponse, handle: WorkerHandle
                ) -> Chunk | None:
        """The prefill's last message: the handoff's report after a first token that was not
        the last (nothing for the client), or the request's end (its first token was a stop
        token), or an abort (the request runs colocated)."""
        if response.finish_reason == worker_pb2.FINISH_REASON_LENGTH:
            self.num_pages_handed_off = response.usage.pages_handed_off
            self._metrics.pd_handoff_wait.observe(response.usage.handoff_wait_s)
            return None
        if response.finish_reason == worker_pb2.FINISH_REASON_STOP:
            self.is_done = True
            return self._to_chunk(response, handle.worker_id)
        self._fall_back("prefill_aborted")
        return None

    def _fall_back(self, reason: str) -> None:
        self.fallback = reason
        self._metrics.pd_fallbacks.inc(reason=reason)

    def observe_decode(self, chunk: Chunk, handle: WorkerHandle, is_first: bool) -> None:
        """Count the handoff once the decode worker answers: its first token (the time from
        the prefill's), and its usage (the KV bytes it loaded from the store, or took from its
        host tier after a push)."""
        if is_first and chunk.token_ids and self.first_token_at is not None:
            self._metrics.pd_transfer_seconds.observe(time.monotonic() - self.first_token_at)
        if chunk.usage is not None and handle.namespace is not None:
            ns = handle.namespace
            # pushed pages land in the decode worker's host tier ("cpu"), others come from the
            # store; a push that failed went through the store (the worker says which by tier)
            tiers = ("cpu", "store") if self._router.config.pd_transfer == "push" else ("store",)
            tokens = sum(chunk.usage.cached_tokens_by_tier.get(tier, 0) for tier in tiers)
            self._metrics.pd_transfer_bytes.inc(tokens // ns.page_size * ns.page_nbytes)
