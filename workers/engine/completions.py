"""A request's completions from their first token to their end: checking a new request,
detokenizing, stop checks, entering their full pages in the prefix cache (saved through the KV
connector), and ending them (finish, abort, a request that fails alone, a failed batch).

`Completions` is the engine's base: it owns the per-request state named below; `Engine.step`
calls these for every token it reads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import numpy as np

from kvmesh.cachestore.keys import Namespace
from kvmesh.workers.engine.block_manager import BlockManager
from kvmesh.workers.engine.detokenizer import IncrementalDetokenizer
from kvmesh.workers.engine.outputs import RequestOutput, Usage
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.engine.scheduler import Scheduler
from kvmesh.workers.engine.sequence import Sequence
from kvmesh.workers.errors import BatchFailed, InvalidRequest

if TYPE_CHECKING:  # (the generators' type only; this module runs without torch)
    import torch

log = logging.getLogger(__name__)


class PageSaver(Protocol):
    """What completions use of the KV connector (`offload.connector.KvConnector`)."""

    def save(self, ns: Namespace, pages: list[tuple[bytes, list[int], int]]) -> None: ...


class Completions:
    """Engine thread only."""

    scheduler: Scheduler
    block_manager: BlockManager
    offload: PageSaver
    eos_token_ids: set[int]
    max_model_len: int
    page_size: int

    def __init__(self) -> None:
        self._requests: dict[str, list[Sequence]] = {}  # request id -> its completions
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its sampling generator
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._pending: list[RequestOutput] = []  # outputs made between steps, sent next step

    def abort_request(self, request_id: str) -> None:
        """Free the request's pages; its unfinished completions end with "abort" (emitted by
        the next step()). Unknown or finished ids are ignored."""
        self._pending += self._end_request(request_id, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def _check_request(self, request_id: str, prompt_token_ids: list[int],
                       sampling: SamplingParams, vocab: int, page_size: int, num_pages: int
                       ) -> np.ndarray:
        """The prompt as int64 ids; raises InvalidRequest for an empty or too long prompt, bad
        params or a duplicate id."""
        if not request_id:
            raise InvalidRequest("request_id must not be empty")
        if request_id in self._requests:
            raise InvalidRequest(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise InvalidRequest("prompt must not be empty")
        ids = None
        if set(map(type, prompt_token_ids)) <= {int}:
            try:
                ids = np.asarray(prompt_token_ids, dtype=np.int64)
            except OverflowError:
                pass
        if ids is None or ids.min() < 0 or ids.max() >= vocab:
            raise InvalidRequest(f"prompt token ids must be ints in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(f"prompt has {len(prompt_token_ids)} tokens; this model takes "
                                 f"at most {self.max_model_len - 1}")
        sampling.validate(vocab)
        needed = min(len(prompt_token_ids) + sampling.max_tokens, self.max_model_len)
        if -(-needed // page_size) > num_pages:
            raise InvalidRequest(f"{needed} tokens do not fit the KV cache "
                                 f"({num_pages} pages of {page_size})")
        return ids

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        seq.token_ids.append(token)
        params = seq.sampling
        detok = self._detok[seq.seq_id]
        finish = None
        if token in params.stop_token_ids or (not params.ignore_eos
                                              and token in self.eos_token_ids):
            finish = "stop"
        is_special = token in self.eos_token_ids
        text = detok.add(token, skip=is_special)
        if finish is None and detok.hit_stop:
            finish = "stop"
        if finish is None and (seq.num_output_tokens >= params.max_tokens
                               or seq.num_tokens >= self.max_model_len):
            finish = "length"
        if finish is None:
            return RequestOutput(seq.request_id, seq.index, [token], text)
        text += detok.flush()
        self.scheduler.remove(seq)
        out = self._final(seq, [token], text, finish)
        remaining = self._requests.get(seq.request_id, [])
        if all(s.is_finished for s in remaining) and not seq.fork_pending:
            self._requests.pop(seq.request_id, None)
        return out

    def _register_full_pages(self, seq: Sequence) -> None:
        """Enter seq's newly full computed pages in the prefix cache, and save those it took
        (a page cached already under its key is not) through the KV connector."""
        num_full = seq.num_computed_tokens // self.page_size
        if num_full <= seq.num_registered_pages:
            return
        keys = seq.full_page_keys(num_full)
        first = seq.num_registered_pages
        ps = self.page_size
        registered = self.block_manager.register_run(
            seq.page_ids[first:num_full], keys[first:num_full], keys[first - 1] if first else None,
            seq.token_ids[first * ps : num_full * ps], seq.namespace)
        self.offload.save(seq.namespace, [
            (keys[first + i], seq.page_tokens(first + i), seq.page_ids[first + i])
            for i in registered])
        seq.num_registered_pages = num_full

    def _quarantine(self, request_id: str, error: Exception,
                    first: Sequence | None = None) -> list[RequestOutput]:
        """Abort a request that raised inside the step: its unfinished completions end with
        finish_reason "error" and its pages are freed; no other request changes. At least one
        output is returned (`first`'s first, when given), so the caller always learns of it."""
        log.warning("request %s failed in the engine step; quarantined: %r", request_id, error)
        message = f"request failed in the engine and was aborted ({type(error).__name__}: {error})"
        outputs = self._end_request(request_id, "error", message, first)
        if not outputs:  # every completion had finished before the failure
            outputs.append(RequestOutput(request_id, 0, [], "", "error", error=message))
        return outputs

    def _fail_batch(self, seqs: list[Sequence], error: Exception,
                    outputs: list[RequestOutput]) -> BatchFailed:
        """Abort every request with a sequence in the failed batch (no load stays in flight);
        returns the error naming them. `outputs`, made by this step before it failed, go out
        with the next step so no other request loses its tokens or its end."""
        self._pending = outputs + self._pending
        request_ids = list(dict.fromkeys(seq.request_id for seq in seqs))
        log.error("engine step failed; aborting its batch %s", request_ids, exc_info=error)
        self.scheduler.drop_loads(seqs)
        for request_id in request_ids:
            self._end_request(request_id, "error")  # (the error reaches them as BatchFailed)
        return BatchFailed(f"engine step failed: {type(error).__name__}: {error}", request_ids)

    def _end_request(self, request_id: str, reason: str, error: str | None = None,
                     first: Sequence | None = None) -> list[RequestOutput]:
        """Forget a request: its unfinished completions (and `first`, given first) leave the
        scheduler, their pages freed, each with a final output of `reason`."""
        seqs = self._requests.pop(request_id, [])
        if first is not None:
            seqs = [first] + [s for s in seqs if s is not first]
        outputs = []
        for seq in seqs:
            if seq is first or not seq.is_finished:
                self.scheduler.remove(seq)
                outputs.append(self._final(seq, [], "", reason, error=error))
        return outputs

    def _final(self, seq: Sequence, tokens: list[int], text: str, reason: str,
               error: str | None = None) -> RequestOutput:
        by_tier = dict(seq.cached_tokens_by_tier)
        usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens,
                      sum(by_tier.values()), by_tier)
        self._detok.pop(seq.seq_id, None)
        self._generators.pop(seq.seq_id, None)
        return RequestOutput(seq.request_id, seq.index, tokens, text, reason, usage, error)
