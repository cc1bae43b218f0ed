"""One completion being generated: its tokens, pages, progress and per-completion state."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from kvmesh.cachestore.keys import Namespace, chain_keys, tokens_to_bytes
from kvmesh.workers.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    namespace: Namespace
    arrival: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool
    page_ids: list[int] = field(default_factory=list)
    num_registered_pages: int = 0  # leading full pages entered in the prefix cache
    keys: list[bytes] = field(default_factory=list)  # chained keys of full pages of token_ids
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # set on first admission
    is_first_admission: bool = True
    fork_pending: bool = False  # n > 1: children are forked once the prompt is computed
    # detokenization / stopping
    text: str = ""
    num_text_sent: int = 0
    num_tokens_sent: int = 0
    finish_reason: str | None = None
    # the prompt's token ids as little-endian int32 (keys and page checks), made once
    prompt_bytes: bytes | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def full_page_keys(self, num_pages: int) -> list[bytes]:
        """Keys of the first `num_pages` full pages, extending the chain as needed."""
        page_size = self.namespace.page_size
        assert num_pages * page_size <= len(self.token_ids)
        if len(self.keys) < num_pages:
            start = len(self.keys)
            parent = self.keys[-1] if self.keys else self.namespace.digest
            data = self.token_bytes(start * page_size, num_pages * page_size)
            self.keys.extend(chain_keys(parent, data, page_size))
        return self.keys[:num_pages]

    def token_bytes(self, start: int, end: int) -> bytes:
        """Token ids start..end-1 as little-endian int32 bytes."""
        if end > self.num_prompt_tokens:
            return tokens_to_bytes(self.token_ids[start:end])
        if self.prompt_bytes is None:
            self.prompt_bytes = tokens_to_bytes(self.token_ids[: self.num_prompt_tokens])
        return self.prompt_bytes[4 * start : 4 * end]

    def page_tokens(self, page_index: int) -> list[int]:
        page_size = self.namespace.page_size
        return self.token_ids[page_index * page_size : (page_index + 1) * page_size]

    def fork(self, index: int, sampling: SamplingParams) -> Sequence:
        """A sibling completion sharing this sequence's computed state (caller refs the pages)."""
        return Sequence(
            request_id=self.request_id,
            index=index,
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            sampling=sampling,
            namespace=self.namespace,
            arrival=self.arrival,
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            page_ids=list(self.page_ids),
            num_registered_pages=self.num_registered_pages,
            keys=list(self.keys),
            cached_tokens_by_tier=dict(self.cached_tokens_by_tier),
            is_first_admission=False,
        )
