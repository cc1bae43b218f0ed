"""The host-side inputs of one forward over a scheduled batch."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.workers.engine.scheduler import ScheduledBatch

# A batch whose chunks are all this short (e.g. the suffix after a prefix hit) attends with the
# split-KV decode kernel, one query row per token: the prefill kernel parallelizes over query
# blocks, so a few tokens over a long context would run on a handful of SMs.
SHORT_CHUNK_TOKENS = 16


def _one_row_per_token(page_rows: list[list[int]], seq_lens: list[int],
                       cu: list[int]) -> tuple[list[list[int]], list[int]]:
    """Token j of sequence i's chunk becomes a row that sees the sequence's first
    seq_lens[i] - chunk_len + j + 1 positions: causal attention as a batch of decodes."""
    rows: list[list[int]] = []
    lens: list[int] = []
    for row, seq_len, start, end in zip(page_rows, seq_lens, cu[:-1], cu[1:], strict=True):
        first = seq_len - (end - start)
        rows.extend([row] * (end - start))
        lens.extend(range(first + 1, seq_len + 1))
    return rows, lens


@dataclass(slots=True)
class StepInputs:
    """One forward's host-side inputs, a row per token (page_rows / seq_lens per sequence, or
    per token once `rows_are_tokens` spreads them out)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    page_rows: list[list[int]]
    seq_lens: list[int]
    cu: list[int]  # cumulative tokens per sequence, from 0
    sampled: list[int]
    is_decode: bool  # one token per sequence
    rows_are_tokens: bool  # every chunk short: attention as one decode row per token

    @classmethod
    def of(cls, batch: ScheduledBatch, ps: int) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu = [0]
        sampled: list[int] = []
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            end = start + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.page_ids[p // ps] * ps + p % ps for p in range(start, end))
            seq_lens.append(end)
            cu.append(cu[-1] + num_new)
            if end == seq.num_tokens:
                sampled.append(i)
        is_decode = all(n == 1 for n in batch.num_new_tokens)
        page_rows = [seq.page_ids for seq in batch.seqs]
        # short chunks (a prefix hit's suffix, decodes): every token a decode row
        rows_are_tokens = max(batch.num_new_tokens) <= SHORT_CHUNK_TOKENS
        if rows_are_tokens and not is_decode:
            page_rows, seq_lens = _one_row_per_token(page_rows, seq_lens, cu)
        return cls(input_ids, positions, slots, page_rows, seq_lens, cu, sampled, is_decode,
                   rows_are_tokens)

    @property
    def last_rows(self) -> list[int]:
        """The token row of each sampled sequence's last token."""
        return [self.cu[i + 1] - 1 for i in self.sampled]
