"""The `Worker` gRPC servicer: thin handlers over the EngineLoop, errors mapped in one table."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import grpc

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.engine.page_exchange import import_prompt_pages
from kvmesh.workers.errors import (
    EngineFailure,
    InvalidRequest,
    NoHostTier,
    NoStore,
    RequestFailed,
    SubscriberTooSlow,
    WorkerNotReady,
)
from kvmesh.workers.service.engine_loop import EngineLoop
from kvmesh.workers.service.handoff import Handoff
from kvmesh.workers.service.streams import RequestStream, coalesce
from kvmesh.workers.service.wire import (
    RequestLimits,
    event_to_pb,
    finish_to_pb,
    output_to_pb,
    parse_generate_request,
    parse_push_request,
    stats_to_pb,
)

log = logging.getLogger(__name__)

# The one table: typed error -> gRPC status. Anything else is INTERNAL (and logged).
STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NoStore: grpc.StatusCode.FAILED_PRECONDITION,
    NoHostTier: grpc.StatusCode.FAILED_PRECONDITION,
    WorkerNotReady: grpc.StatusCode.UNAVAILABLE,
    SubscriberTooSlow: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineFailure: grpc.StatusCode.INTERNAL,
    RequestFailed: grpc.StatusCode.INTERNAL,
}
# Trailing metadata on an error that is the request's own (worker.proto, Generate): the router
# neither retries it elsewhere nor counts it against the worker.
FAILURE_SCOPE_KEY = "kvmesh-failure-scope"
FAILURE_SCOPE_BY_ERROR: dict[type[BaseException], str] = {RequestFailed: "request"}
PUSH_TIMEOUT_S = 30.0  # for the engine thread to take pushed pages between steps


def status_of(error: BaseException) -> grpc.StatusCode:
    for error_type, code in STATUS_BY_ERROR.items():
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def abort_args(context: Any, error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and details that end an RPC failed by `error`; sets the failure-scope
    trailing metadata on `context` (sync or grpc.aio) where the error has one."""
    code = status_of(error)
    scope = next((v for k, v in FAILURE_SCOPE_BY_ERROR.items() if isinstance(error, k)), None)
    if scope is not None:
        context.set_trailing_metadata(((FAILURE_SCOPE_KEY, scope),))
    elif code == grpc.StatusCode.INTERNAL:
        log.error("internal error: %r", error)
    return code, str(error) or type(error).__name__


def _abort(context: grpc.ServicerContext, error: BaseException) -> None:
    """End the RPC with the error's status; raises (grpc's abort never returns)."""
    context.abort(*abort_args(context, error))


def prefill_final(request_id: str, request: worker_pb2.GenerateRequest, output: Any,
                  handoff: Handoff) -> worker_pb2.GenerateResponse:
    """A prefill-only request's last message, once its pages are handed over (blocks: waits
    for the store writes or the push)."""
    prompt = list(request.prompt_token_ids)
    result = (handoff.push(request.push_to, prompt, request.tenant_salt)
              if request.push_to else handoff.finish(prompt, request.tenant_salt))
    final = finish_to_pb(request_id, output)
    final.usage.pages_handed_off = result.num_pages
    final.usage.handoff_wait_s = result.wait_s
    return final


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves one EngineLoop. Handlers run on gRPC's thread pool and never touch the engine."""

    def __init__(self, loop: EngineLoop, max_num_seqs: int, role: str = "both",
                 token: str | None = None) -> None:
        self._loop = loop
        self._max_num_seqs = max_num_seqs
        self._role = role
        self._token = token  # this worker's own: pushes to its peers carry it
        self._limits: RequestLimits | None = None
        self._handoff: Handoff | None = None

    def _request_limits(self) -> RequestLimits:
        """Limits read once from the loaded engine's fixed attributes (safe from any thread)."""
        if self._limits is None:
            engine = self._loop.wait_ready(timeout=0)  # raises WorkerNotReady while loading
            self._limits = RequestLimits(
                max_model_len=engine.max_model_len,
                vocab_size=int(engine.model_config.vocab_size),
                max_num_seqs=self._max_num_seqs,
                page_size=engine.page_size,
            )
        return self._limits

    def _prefill_handoff(self) -> Handoff:
        """The handoff of prefill-only requests; NoStore on a worker without a store."""
        if self._handoff is None:
            engine = self._loop.wait_ready(timeout=0)
            self._handoff = Handoff(engine.offload, self._loop.base_namespace, self._loop.call,
                                    self._token)
        if not self._handoff.has_store:
            raise NoStore("prefill_only needs a worker with a store (kvmesh worker --store)")
        return self._handoff

    def _start(self, request: worker_pb2.GenerateRequest
               ) -> tuple[str, Handoff | None, RequestStream]:
        """Check a Generate request and queue it: (request id, its prefill handoff if it is
        prefill-only, its output stream). Raises the typed errors the status table maps. Both
        servers' Generate start here."""
        request_id = request.request_id or uuid.uuid4().hex
        prompt, sampling = parse_generate_request(request, self._request_limits())
        handoff = self._prefill_handoff() if request.prefill_only else None
        stream = self._loop.submit(request_id, prompt, sampling, request.tenant_salt)
        return request_id, handoff, stream

    def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.GenerateResponse]:
        try:
            request_id, handoff, stream = self._start(request)
        except Exception as exc:  # noqa: BLE001 - mapped by the table
            _abort(context, exc)
            return
        # Runs when the RPC ends for any reason: a client that cancels or disconnects aborts
        # the request so its pages are freed (a no-op once the request finished).
        if not context.add_callback(stream.cancel):
            stream.cancel()  # the RPC had already ended
            return
        try:
            if handoff is None:
                for outputs in stream.batches():
                    for output in coalesce(outputs):
                        yield output_to_pb(request_id, output)
            else:
                yield from self._prefill(request_id, request, stream, handoff)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    @staticmethod
    def _prefill(request_id: str, request: worker_pb2.GenerateRequest, stream: RequestStream,
                 handoff: Handoff) -> Iterator[worker_pb2.GenerateResponse]:
        """A prefill-only request's answer: the first token at once, then its finish and usage
        once the prompt's pages are in the store (`handoff.Handoff`)."""
        for output in stream:
            yield output_to_pb(request_id, output, with_finish=False)
            if output.finish_reason is not None:
                yield prefill_final(request_id, request, output, handoff)


    def PushPages(self, request: worker_pb2.PushPagesRequest, context: grpc.ServicerContext
                  ) -> worker_pb2.PushPagesResponse:
        try:
            prompt, first_page, pages = parse_push_request(request, self._request_limits())
            num_pages = self._loop.call(
                lambda engine: import_prompt_pages(engine, request.tenant_salt, prompt,
                                                   first_page, pages), PUSH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - mapped by the table
            _abort(context, exc)
            raise  # unreachable: abort raises
        return worker_pb2.PushPagesResponse(num_pages=num_pages)

    def KvEvents(
        self, request: worker_pb2.KvEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.KvEvent]:
        try:
            subscription = self._loop.subscribe()
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)
            return
        if not context.add_callback(subscription.close):
            subscription.close()
            return
        epoch = self._loop.epoch
        try:
            for item in subscription:
                yield event_to_pb(item.seq, item.event, epoch)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    def Stats(
        self, request: worker_pb2.WorkerStatsRequest, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerStats:
        try:
            engine = self._loop.wait_ready(timeout=0)
        except WorkerNotReady as exc:
            _abort(context, exc)
            raise  # unreachable: abort raises
        # Snapshots kept by the loop thread: Stats answers at once even during a long step.
        return stats_to_pb(engine, self._loop.engine_stats, self._loop.base_namespace,
                           self._loop.epoch, self._loop.kv_events_seq, self._role)
