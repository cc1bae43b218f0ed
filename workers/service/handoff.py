"""The prefill half of a disaggregated request (`GenerateRequest.prefill_only`): once the first
token is out, wait for the prompt's pages to reach the store, then say how many are there.

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
from dataclasses import dataclass
from typing import Any, Protocol

from kvmesh.cachestore.keys import Namespace

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 30.0  # longest wait for the prompt's store writes


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


class Handoff:
    """Thread-safe: the writer's wait and the store client's lookup are."""

    def __init__(self, writes: HandoffWrites, base_namespace: Namespace,
                 timeout: float = HANDOFF_TIMEOUT_S) -> None:
        self._writes, self._base, self._timeout = writes, base_namespace, timeout

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
