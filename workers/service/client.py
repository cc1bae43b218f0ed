"""Typed client of the `Worker` gRPC service: callers (the router, tests) never see pb2 objects.

Light on purpose (grpc + protobuf + xxhash, no torch) so the router can import it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc.wire import GRPC_OPTIONS, namespace_from_spec
from kvmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvmesh.workers.engine.sampling_params import SamplingParams

_FINISH_REASONS = {
    worker_pb2.FINISH_REASON_STOP: "stop",
    worker_pb2.FINISH_REASON_LENGTH: "length",
    worker_pb2.FINISH_REASON_ABORT: "abort",
}
# Wire tiers -> the engine's tier names ("store" is the shared store).
_TIER_NAMES = {
    common_pb2.TIER_DEVICE: "device",
    common_pb2.TIER_CPU: "cpu",
    common_pb2.TIER_DISK: "disk",
    common_pb2.TIER_REDIS: "redis",
    common_pb2.TIER_REMOTE: "store",
}


class WorkerError(Exception):
    """A failed worker call. `code` is the gRPC status name ("INVALID_ARGUMENT", "UNAVAILABLE",
    ...); `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    @property
    def is_invalid_request(self) -> bool:
        return self.code == "INVALID_ARGUMENT"

    @property
    def is_unavailable(self) -> bool:
        """The worker is down, loading or shutting down: another worker may serve the call."""
        return self.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    pages_handed_off: int = 0  # prefill_only requests (worker.proto, Usage)
    handoff_wait_s: float = 0.0


@dataclass(frozen=True)
class GenerateOutput:
    """New tokens of completion `index`; `finish_reason` ("stop" | "length" | "abort") and
    `usage` are set on each completion's last output only."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None


@dataclass(frozen=True)
class KvEvent:
    """kind "cleared" (drop everything; `epoch` set), "stored" or "removed" (`keys`, `tier`;
    `parent` is the key before keys[0], None for a first page)."""

    seq: int
    kind: str
    keys: list[bytes] = field(default_factory=list)
    parent: bytes | None = None
    tier: str | None = None
    epoch: int | None = None


@dataclass(frozen=True)
class WorkerStats:
    model: str
    page_size: int
    num_pages_total: int
    num_pages_free: int
    num_running: int
    num_waiting: int
    prefix_queries: int  # prompt tokens looked up
    prefix_hits: dict[str, int]  # tokens found, by tier
    epoch: int
    max_model_len: int
    namespace: Namespace  # empty salt; use namespace.with_salt(tenant_salt)
    kv_events_seq: int
    role: str = "both"  # "both", "prefill" or "decode"


def _error(exc: grpc.RpcError) -> WorkerError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return WorkerError(code.name if code is not None else "UNKNOWN", details or "")


class WorkerClient:
    """Connection to one worker. Thread-safe; one channel shared by all calls. Raises WorkerError.
    `close()` (or a with-block) releases the channel; cancelling a generate() iterator
    (`close()` on it, or dropping it) cancels the RPC, and the worker aborts the request."""

    def __init__(self, target: str, token: str | None = None, tls: str | None = None) -> None:
        """`tls`: path of the PEM root certificate to trust; None = plaintext."""
        self.target = target
        if tls is not None:
            with open(tls, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            self._channel = grpc.secure_channel(target, credentials, options=GRPC_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant_salt: str = "",
        timeout: float | None = None,
        prefill_only: bool = False,
        push_to: str = "",
    ) -> Iterator[GenerateOutput]:
        """Stream the outputs of one request (all `sampling.n` completions interleaved).
        `prefill_only`: the first token, then the finish once the prompt's pages are in the
        store, or pushed to the worker at `push_to` (worker.proto, GenerateRequest)."""
        sampling = sampling if sampling is not None else SamplingParams()
        pb_sampling = worker_pb2.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            stop=sampling.stop,
            stop_token_ids=sampling.stop_token_ids,
            ignore_eos=sampling.ignore_eos,
            n=sampling.n,
        )
        if sampling.seed is not None:
            pb_sampling.seed = sampling.seed
        request = worker_pb2.GenerateRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=prompt_token_ids,
            sampling=pb_sampling,
            tenant_salt=tenant_salt,
            prefill_only=prefill_only,
            push_to=push_to,
        )
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        return _generate_outputs(call)

    def kv_events(self, timeout: float | None = None) -> KvEventStream:
        """Subscribe: a "cleared" event, the snapshot as "stored" events, then live events.
        `.cancel()` on the returned stream ends the subscription (from any thread)."""
        call = self._stub.KvEvents(
            worker_pb2.KvEventsRequest(), timeout=timeout, metadata=self._metadata
        )
        return KvEventStream(call)

    def stats(self, timeout: float | None = 10.0) -> WorkerStats:
        try:
            s = self._stub.Stats(
                worker_pb2.WorkerStatsRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return WorkerStats(
            model=s.model,
            page_size=s.page_size,
            num_pages_total=s.num_pages_total,
            num_pages_free=s.num_pages_free,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            prefix_queries=s.prefix_queries,
            prefix_hits=dict(s.prefix_hits),
            epoch=s.epoch,
            max_model_len=s.max_model_len,
            namespace=namespace_from_spec(s.namespace),
            kv_events_seq=s.kv_events_seq,
            role=s.role,
        )


def _generate_outputs(call: Any) -> Iterator[GenerateOutput]:
    try:
        for m in call:
            usage = None
            if m.HasField("usage"):
                u = m.usage
                usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens,
                              dict(u.cached_tokens_by_tier), u.pages_handed_off,
                              u.handoff_wait_s)
            yield GenerateOutput(
                request_id=m.request_id,
                index=m.index,
                token_ids=list(m.token_ids),
                text=m.text,
                finish_reason=_FINISH_REASONS.get(m.finish_reason),
                usage=usage,
            )
    except grpc.RpcError as exc:
        raise _error(exc) from None
    finally:
        call.cancel()  # no-op after a clean end; aborts the request when the caller stops early


class KvEventStream:
    """Iterator over one KvEvents subscription. `cancel()` ends it from any thread (the
    iterating thread then stops cleanly); iteration raises WorkerError if the worker fails."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._is_cancelled = False

    def __iter__(self) -> KvEventStream:
        return self

    def __next__(self) -> KvEvent:
        try:
            m = next(self._call)
        except grpc.RpcError as exc:
            if self._is_cancelled or exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise _error(exc) from None
        kind = m.WhichOneof("kind")
        if kind == "cleared":
            return KvEvent(seq=m.seq, kind="cleared", epoch=m.cleared.epoch)
        if kind == "stored":
            return KvEvent(seq=m.seq, kind="stored", keys=list(m.stored.keys),
                           parent=m.stored.parent or None, tier=_TIER_NAMES.get(m.stored.tier))
        return KvEvent(seq=m.seq, kind="removed", keys=list(m.removed.keys),
                       tier=_TIER_NAMES.get(m.removed.tier))

    def cancel(self) -> None:
        self._is_cancelled = True
        self._call.cancel()

    close = cancel
