"""The prefill half of a disaggregated request (`GenerateRequest.prefill_only`): once the first
token is out, hand the prompt's pages over, then say how many the decode side will find.

Two ways: through the store (`finish`, the default), or pushed straight into the decode
worker's host tier (`push`, when the request names one in `push_to`): the prompt's pages are
read off the device on the engine thread and sent with `Worker.PushPages`; if that fails, the
handoff goes through the store after all.

The engine writes every newly full page through to the store from a thread of its own
(`offload.store_writer`); a prefill worker's answer is only useful once a decode worker can
find those pages. `Handoff.finish` runs on the request's gRPC handler thread, never on the
engine thread: it waits for the writes queued so far (the prompt's were queued by the step
that produced the first token, before its output reached the handler), then looks the prompt
up in the store, which also counts pages an earlier request wrote and misses pages whose
write was dropped or failed. The decode worker recomputes whatever is missing, so a short
count costs time, never correctness.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc.wire import GRPC_OPTIONS
from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.engine.page_exchange import export_prompt_pages

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 30.0  # longest wait for the prompt's store writes, or for a push
PUSH_BATCH_NBYTES = 32 << 20  # pages per PushPages call: under the 64 MiB message limit


class HandoffStore(Protocol):
    """What the handoff reads of the engine's store client (`StoreClient`)."""

    def lookup(self, tokens: Any, namespace: Namespace) -> Any: ...  # .num_tokens


class HandoffWrites(Protocol):
    """What the handoff waits on (`offload.host_offload.KvOffload`)."""

    store: HandoffStore | None

    def wait_store_writes(self, timeout: float) -> bool: ...


@dataclass(frozen=True)
class HandoffResult:
    num_pages: int  # full prompt pages the store holds now
    wait_s: float  # seconds spent waiting for the writes and the lookup


EngineCall = Callable[[Callable[[Any], Any], float], Any]  # EngineLoop.call


class Handoff:
    """Thread-safe: the writer's wait, the store client's lookup and `engine_call` are.
    `token`: the bearer token pushes carry (this worker's own; workers of one deployment share
    one)."""

    def __init__(self, writes: HandoffWrites, base_namespace: Namespace,
                 engine_call: EngineCall, token: str | None = None,
                 timeout: float = HANDOFF_TIMEOUT_S) -> None:
        self._writes, self._base, self._timeout = writes, base_namespace, timeout
        self._engine_call, self._token = engine_call, token

    @property
    def has_store(self) -> bool:
        return self._writes.store is not None

    def finish(self, prompt: list[int], tenant_salt: str) -> HandoffResult:
        """Wait for the store writes queued so far, then count the prompt's pages there. A
        timeout or a failed lookup is logged and counted as what the lookup saw (0 if none)."""
        started = time.monotonic()
        if not self._writes.wait_store_writes(self._timeout):
            log.warning("prefill handoff: store writes still pending after %.0f s",
                        self._timeout)
        store = self._writes.store
        num_pages = 0
        if store is not None:
            try:
                found = store.lookup(prompt, self._base.with_salt(tenant_salt))
                num_pages = found.num_tokens // self._base.page_size
            except Exception as exc:  # noqa: BLE001 - a sick store is a short count
                log.warning("prefill handoff: store lookup failed: %s", exc)
        return HandoffResult(num_pages, time.monotonic() - started)

    def push(self, target: str, prompt: list[int], tenant_salt: str) -> HandoffResult:
        """Send the prompt's pages on this worker's device to worker `target`'s host tier;
        through the store (`finish`) if that fails or the device holds none."""
        started = time.monotonic()
        try:
            blobs = self._engine_call(
                lambda engine: export_prompt_pages(engine, tenant_salt, prompt), self._timeout)
            num_pages = self._send(target, prompt, tenant_salt, blobs) if blobs else 0
        except Exception as exc:  # noqa: BLE001 - a failed push is a handoff through the store
            log.warning("prefill handoff: push to %s failed (%s); through the store", target,
                        exc)
            num_pages = 0
        if num_pages:
            return HandoffResult(num_pages, time.monotonic() - started)
        through_store = self.finish(prompt, tenant_salt)
        return HandoffResult(through_store.num_pages, time.monotonic() - started)

    def _send(self, target: str, prompt: list[int], tenant_salt: str,
              blobs: list[bytes]) -> int:
        """PushPages calls of at most PUSH_BATCH_NBYTES each; the pages `target` took."""
        metadata = (("authorization", f"Bearer {self._token}"),) if self._token else ()
        deadline = time.monotonic() + self._timeout
        per_call = max(1, PUSH_BATCH_NBYTES // len(blobs[0]))
        taken = 0
        with grpc.insecure_channel(target, options=GRPC_OPTIONS) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            for first in range(0, len(blobs), per_call):
                batch = blobs[first : first + per_call]
                reply = stub.PushPages(worker_pb2.PushPagesRequest(
                    tenant_salt=tenant_salt, prompt_token_ids=prompt, first_page=first,
                    pages=batch), metadata=metadata,
                    timeout=max(deadline - time.monotonic(), 0.001))
                taken += reply.num_pages
                if reply.num_pages < len(batch):
                    break
        return taken
