"""The router's core: tokenize, compute page keys per tenant, pick a worker, stream its output,
and move a request that produced no token yet to another worker when its worker fails.
Transport-free: app.py turns `Chunk`s into HTTP responses."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence

import grpc

from kvmesh.cachestore.keys import Namespace, SaltedNamespaces
from kvmesh.cachestore.rpc.auth import tenant_salt
from kvmesh.router.config import RouterConfig
from kvmesh.router.disagg import PrefillPhase, wants_prefill_worker
from kvmesh.router.errors import (
    InvalidRequest,
    ModelNotFound,
    NoCandidate,
    NoWorkerAvailable,
    Overloaded,
    PromptTooLong,
    RequestFailed,
    WorkerFailed,
)
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.requests import Chunk, ParsedRequest, Prepared
from kvmesh.router.routing.index import PrefixIndex
from kvmesh.router.routing.policy import BalanceThreshold, Decision, choose
from kvmesh.router.routing.pool import RETRYABLE_CODES, WorkerHandle, WorkerPool, is_request_failure
from kvmesh.router.routing.store_probe import StoreProbe
from kvmesh.router.tokenizer import PromptTokenizer
from kvmesh.v1 import worker_pb2

MAX_TENANT_NAMESPACES = 1024  # salted namespaces kept built (one per tenant and model)
METRICS_BATCH = 256  # a stream's inter-token gaps held before they are written to the metrics
METRICS_FLUSH_S = 1.0  # ... or this long since they were last written, whichever comes first
FINISH_REASONS = {
    worker_pb2.FINISH_REASON_STOP: "stop",
    worker_pb2.FINISH_REASON_LENGTH: "length",
    worker_pb2.FINISH_REASON_ABORT: "abort",
}


class Router:
    def __init__(self, config: RouterConfig, tokenizer: PromptTokenizer, pool: WorkerPool,
                 index: PrefixIndex, metrics: RouterMetrics,
                 store: StoreProbe | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pool = pool
        self.index = index
        self.metrics = metrics
        self.store = store
        self.balance = BalanceThreshold(config.balance_abs, config.balance_rel)
        self.num_inflight = 0
        self._salted = SaltedNamespaces(MAX_TENANT_NAMESPACES)
        self._ids = itertools.count()

    # ---- model facts the workers report ---------------------------------------------------
    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        for handle in self.pool.workers.values():
            if handle.stats is not None and handle.stats.model:
                return handle.stats.model
        return "kvmesh"

    @property
    def max_model_len(self) -> int | None:
        if self.config.max_model_len:
            return self.config.max_model_len
        lens = [h.stats.max_model_len for h in self.pool.workers.values()
                if h.stats is not None and h.stats.max_model_len]
        return min(lens) if lens else None

    # ---- request lifecycle ----------------------------------------------------------------
    def prepare(self, parsed: ParsedRequest, tenant: str) -> Prepared:
        """Check the model, tokenize, check the length. Raises a RouterError for bad input."""
        if parsed.model is not None and parsed.model != self.model_name:
            raise ModelNotFound(f"model '{parsed.model}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model")
        if parsed.messages is not None:
            prompt_ids = self.tokenizer.encode_chat(parsed.messages)
        elif isinstance(parsed.prompt, str):
            prompt_ids = self.tokenizer.encode(parsed.prompt)
        else:
            prompt_ids = list(parsed.prompt or ())
        if not prompt_ids:
            raise InvalidRequest("the prompt has no tokens", param="prompt")
        limit = self.max_model_len
        wanted = parsed.sampling.max_tokens or 1
        if limit is not None and len(prompt_ids) + wanted > limit:
            raise PromptTooLong(
                f"this model's maximum context length is {limit} tokens; the prompt has "
                f"{len(prompt_ids)} tokens and {wanted} more were requested", param="messages"
                if parsed.is_chat else "prompt")
        if self.num_inflight >= self.config.max_inflight:
            raise Overloaded(f"router has {self.num_inflight} requests in flight; retry later")
        request_id = f"{'chatcmpl' if parsed.is_chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        return Prepared(request_id, prompt_ids, tenant_salt(self.config.secret, tenant), parsed)

    async def store_pages(self, prompt_ids: list[int], salt: str) -> int:
        """Pages of the prompt the shared store holds (0 without a store or on failure)."""
        if self.store is None:
            return 0
        handle = next((h for h in self.pool.available()), None)
        if handle is None or handle.namespace is None:
            return 0
        return await self.store.num_pages(self._salted_namespace(handle.namespace, salt),
                                          prompt_ids)

    def route(self, prompt_ids: Sequence[int], salt: str, exclude: Sequence[str] = (),
              num_store_pages: int = 0, part: str = "decode") -> tuple[WorkerHandle, Decision]:
        """Pick the cheapest worker for `part` of a request ("decode": a whole request or its
        rest after a prefill worker; "prefill") and record predicted entries for the prompt on
        it."""
        handles = {h.worker_id: h for h in self.pool.available(part)
                   if h.worker_id not in exclude}
        if not handles:
            raise NoWorkerAvailable("no healthy worker can take the request")
        matches = {}
        keys_by_worker: dict[str, list[bytes]] = {}
        page_size = 16
        for digest_keys, group in self._keys_by_namespace(handles.values(), prompt_ids, salt):
            found = self.index.match(digest_keys)
            for handle in group:
                keys_by_worker[handle.worker_id] = digest_keys
                page_size = handle.namespace.page_size  # type: ignore[union-attr]
                if handle.worker_id in found:
                    matches[handle.worker_id] = found[handle.worker_id]
        try:  # the handles carry live num_inflight / num_queued_tokens
            decision = choose(len(prompt_ids), page_size, matches, handles,
                              num_store_pages=num_store_pages, balance=self.balance)
        except NoCandidate as exc:
            raise NoWorkerAvailable(str(exc)) from None
        self.index.predict(decision.worker_id, keys_by_worker[decision.worker_id])
        self.metrics.decisions.inc(reason=decision.reason, worker=decision.worker_id)
        return handles[decision.worker_id], decision

    def _keys_by_namespace(
        self, handles: Iterable[WorkerHandle], prompt_ids: Sequence[int], salt: str
    ) -> Iterator[tuple[list[bytes], list[WorkerHandle]]]:
        groups: dict[bytes, tuple[Namespace, list[WorkerHandle]]] = {}
        for handle in handles:
            namespace = handle.namespace
            assert namespace is not None  # pool.available() only lists workers that reported it
            groups.setdefault(namespace.digest, (namespace, []))[1].append(handle)
        for namespace, group in groups.values():
            yield self._salted_namespace(namespace, salt).page_keys(prompt_ids), group

    def _salted_namespace(self, base: Namespace, salt: str) -> Namespace:
        return self._salted.get(base, salt)

    def generate_request(self, prep: Prepared, sent: Sequence[int] = ()
                          ) -> worker_pb2.GenerateRequest:
        """The worker's request; `sent`: tokens a failed worker already streamed to the client,
        which the next one takes as part of the prompt (their pages from the store) and which
        count against max_tokens."""
        s = prep.parsed.sampling
        sampling = worker_pb2.SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            max_tokens=s.max_tokens - len(sent) if s.max_tokens else 0,
            stop=list(s.stop), ignore_eos=s.ignore_eos, n=s.n)
        if s.seed is not None:
            sampling.seed = s.seed
        return worker_pb2.GenerateRequest(request_id=f"{prep.request_id}-{next(self._ids)}",
                                          prompt_token_ids=prep.prompt_ids + list(sent),
                                          sampling=sampling, tenant_salt=prep.salt)

    @staticmethod
    def _can_migrate(prep: Prepared) -> bool:
        """Whether a stream cut after its first tokens can go on on another worker: one
        completion (n > 1 would need each one's tokens), no stop strings (the failed worker may
        have held back text that starts one)."""
        return prep.parsed.sampling.n == 1 and not prep.parsed.sampling.stop

    def _unsent_text(self, sent: list[int], sent_text: str) -> str | None:
        """Text of `sent` that the failed worker had not streamed yet; None if it cannot be told
        exactly (an unfinished character: the next worker would not see its first bytes)."""
        if self.tokenizer is None:  # ids-only routers (tests): no text to keep consistent
            return ""
        text = self.tokenizer.decode(sent)
        if not text.startswith(sent_text) or "\ufffd" in text[len(sent_text):]:
            return None
        return text[len(sent_text):]

    async def run(self, prep: Prepared, *, buffered: bool = False
                  ) -> AsyncGenerator[Chunk, None]:
        """The request's chunks. Streamed (`buffered` False): retried on another worker while
        no output has been yielded; WorkerFailed if a worker fails after that. Buffered: each
        attempt's chunks are held until it finishes, so any worker failure is retried.
        InvalidRequest if the worker rejects the input, RequestFailed if its engine failed on
        this request alone (neither is retried); NoWorkerAvailable when every attempt failed.
        A long prompt's prefill may run on a prefill worker first (router/disagg.py)."""
        tried: list[str] = []
        can_migrate = not buffered and self._can_migrate(prep)
        max_tokens = prep.parsed.sampling.max_tokens
        sent: list[int] = []  # tokens streamed to the client (if it can migrate); resumed from
        sent_text = ""
        finished = False  # the client got the finish chunk: a later error is no failure
        started = time.monotonic()
        last_token_time: float | None = None
        num_prompt = len(prep.prompt_ids)
        # per token: counted here, written to the metrics every METRICS_BATCH gaps or
        # METRICS_FLUSH_S, and at the end
        itls: list[float] = []
        num_generated = 0
        written_at = started
        self.num_inflight += 1
        self.metrics.router_inflight.set(self.num_inflight)
        try:
            num_store_pages = await self.store_pages(prep.prompt_ids, prep.salt)
            first_choice = self.route(prep.prompt_ids, prep.salt,
                                      num_store_pages=num_store_pages)
            prefill = None
            if self._wants_prefill_worker(prep, first_choice, num_store_pages):
                prefill = PrefillPhase(self, prep, num_store_pages, first_choice[0],
                                       lambda r, w: self._chunk(r, w, num_prompt, 0))
                async for chunk in prefill.run(started):
                    yield chunk
                if prefill.is_done:
                    return
                sent, sent_text, held_back = self._handed_off(prefill)
                last_token_time = prefill.first_token_at
                if held_back:  # text the prefill worker held back
                    yield Chunk(0, held_back, [], first_choice[0].worker_id)
            for attempt in range(self.config.max_attempts):
                resumed = len(sent)
                handle, decision = first_choice if attempt == 0 else self.route(
                    prep.prompt_ids + sent if sent else prep.prompt_ids, prep.salt,
                    exclude=tried, num_store_pages=num_store_pages)
                tried.append(handle.worker_id)
                handle.num_inflight += 1
                handle.num_queued_tokens += num_prompt
                queued = True
                produced = False
                held: list[Chunk] = []
                # cancelled in `finally`: closing run() (a client that left) stops the worker
                call = self.pool.generate(handle, self.generate_request(prep, sent))
                try:
                    async for response in call:
                        if queued:
                            queued = False
                            handle.num_queued_tokens -= num_prompt
                        if response.token_ids:
                            now = time.monotonic()
                            if last_token_time is None:
                                self.metrics.ttft.observe(now - started)
                            else:
                                itls.append(now - last_token_time)
                                if (len(itls) >= METRICS_BATCH
                                        or now - written_at >= METRICS_FLUSH_S):
                                    self._record_tokens(itls, num_generated)
                                    num_generated, written_at = 0, now
                            last_token_time = now
                            num_generated += len(response.token_ids)
                        chunk = self._chunk(response, handle.worker_id, num_prompt, resumed)
                        if prefill is not None and prefill.fallback is None:
                            prefill.observe_decode(chunk, handle, is_first=not produced)
                        if buffered:
                            held.append(chunk)
                        else:
                            produced = produced or bool(chunk.token_ids or chunk.text)
                            if can_migrate:
                                sent += chunk.token_ids
                                sent_text += chunk.text
                                finished = chunk.finish_reason is not None
                            yield chunk
                    self.pool.record_success(handle)
                    self.metrics.e2e.observe(time.monotonic() - started)
                    for chunk in held:
                        yield chunk
                    return
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    # the input is to blame: neither retried nor counted against the worker
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise InvalidRequest(f"worker rejected the request: {exc.details()}"
                                             ) from None
                    if is_request_failure(exc):
                        raise RequestFailed(f"worker {handle.worker_id}: {exc.details()}"
                                            ) from None
                    if code not in RETRYABLE_CODES:
                        raise WorkerFailed(f"worker {handle.worker_id}: {code.name} "
                                           f"{exc.details()}") from None
                    self.pool.record_failure(handle, code)
                    if finished:  # the call broke after its last chunk: nothing is missing
                        return
                    if produced or resumed:
                        # a prefill worker's first token always carries over (what it
                        # streamed is in `sent`, even when buffered)
                        movable = can_migrate or prefill is not None
                        unsent = self._unsent_text(sent, sent_text) if movable else None
                        if unsent is None or (max_tokens and len(sent) >= max_tokens):
                            raise WorkerFailed(f"worker {handle.worker_id} failed mid-stream: "
                                               f"{code.name}") from None
                        # migration: the next worker goes on from the tokens sent so far
                        if unsent:
                            sent_text += unsent
                            yield Chunk(0, unsent, [], handle.worker_id)
                        self.metrics.migrations.inc()
                    self.metrics.retries.inc(code=code.name)
                finally:
                    call.cancel()  # a no-op once the call ended
                    handle.num_inflight -= 1
                    if queued:
                        handle.num_queued_tokens -= num_prompt
            raise NoWorkerAvailable(f"request failed on {len(tried)} workers: {tried}")
        finally:
            self._record_tokens(itls, num_generated)
            self.num_inflight -= 1
            self.metrics.router_inflight.set(self.num_inflight)

    def _record_tokens(self, itls: list[float], num_generated: int) -> None:
        """Write a stream's output tokens and inter-token gaps so far to the metrics, in bulk
        (empties `itls`)."""
        self.metrics.itl.observe_many(itls)
        itls.clear()
        if num_generated:
            self.metrics.generation_tokens.inc(num_generated)

    def _wants_prefill_worker(self, prep: Prepared, choice: tuple[WorkerHandle, Decision],
                              num_store_pages: int) -> bool:
        namespace = choice[0].namespace
        page_size = namespace.page_size if namespace is not None else 16
        return wants_prefill_worker(self.config, prep, choice[1], num_store_pages, page_size)

    def _handed_off(self, prefill: PrefillPhase) -> tuple[list[int], str, str]:
        """(tokens, text, text not sent yet) the decode worker goes on from after `prefill`.
        Its first token carries over unless it ends in an unfinished character (its text
        cannot be told; the worker sent none of it): then the decode worker starts from the
        prompt, whose pages are in the store all the same."""
        if not prefill.sent:
            return [], "", ""
        unsent = self._unsent_text(prefill.sent, prefill.text)
        if unsent is None:
            self.metrics.pd_fallbacks.inc(reason="unfinished_character")
            return [], "", ""
        return prefill.sent, prefill.text + unsent, unsent

    def _chunk(self, response: worker_pb2.GenerateResponse, worker_id: str, num_prompt: int,
               resumed: int) -> Chunk:
        """`resumed`: tokens of the completion that an earlier worker generated; the worker took
        them as prompt, the client counts them as completion."""
        finish = FINISH_REASONS.get(response.finish_reason)
        usage = response.usage if response.HasField("usage") else None
        if usage is not None and resumed:
            cached = min(usage.cached_tokens, num_prompt)
            by_tier, left = {}, cached  # the tiers' counts capped to the client's prompt
            for tier, num in usage.cached_tokens_by_tier.items():
                by_tier[tier], left = min(num, left), left - min(num, left)
            usage = worker_pb2.Usage(
                prompt_tokens=num_prompt, completion_tokens=usage.completion_tokens + resumed,
                cached_tokens=cached, cached_tokens_by_tier=by_tier)
        if usage is not None and response.index == 0:
            self.metrics.prompt_tokens.inc(usage.prompt_tokens)
            self.metrics.prefix_queries.inc(usage.prompt_tokens)
            for tier, num in usage.cached_tokens_by_tier.items():
                self.metrics.prefix_hits.inc(num, tier=tier)
        if finish is not None:
            self.metrics.requests.inc(finished_reason=finish)
        return Chunk(response.index, response.text, list(response.token_ids), worker_id, finish,
                     usage)
