"""Multi-step greedy decode: windows of decode steps queued on the device at once.

Each step's argmax feeds the next on the device; the host reads a step's tokens while the later
steps run, and a sequence keeps its tokens up to its stop (the rest, computed past a stop or
max_tokens, are dropped with the pages they were written to). While the batch stays the same
(nobody waits, nobody finished), the next window is queued before the host reads the last step
of the one before, so the device never waits for the scheduler between windows.

Page safety: a finished sequence's pages are released at once while later steps (and a queued
window) still write into them. That holds because pages are allocated here only while no
sequence of the batch has finished (`_continue`), and every other allocation (the engine's
schedule) comes after each queued step was read: the engine calls `resume` before it schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmesh.workers.engine.outputs import RequestOutput
from kvmesh.workers.engine.sequence import Sequence

if TYPE_CHECKING:
    from kvmesh.workers.engine.scheduler import ScheduledBatch, Scheduler
    from kvmesh.workers.runner.cuda_graphs import StepTokens
    from kvmesh.workers.runner.model_runner import ModelRunner

# reads one token of a decoding sequence: its bookkeeping, stop checks and output
TokenReader = Callable[[Sequence, int], RequestOutput]


class DecodeWindows:
    """Owns the queued window (if any) of one engine. decode_steps: steps per window (1: off);
    continue_windows: queue the next window early (on with CUDA graphs, where it overlaps; an
    eager window computes before the call returns, so there it would only hold every window's
    tokens back by one; tests turn it on to cover the logic)."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, max_model_len: int,
                 decode_steps: int, continue_windows: bool, read_token: TokenReader) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.max_model_len = max_model_len
        self.decode_steps = decode_steps
        self.continue_windows = continue_windows
        self._read_token = read_token
        self.queued: tuple[ScheduledBatch, StepTokens] | None = None  # not yet read

    def num_steps(self, batch: ScheduledBatch) -> int:
        """Steps to run back to back for a scheduled batch: >1 only when every sequence decodes
        greedily and pages for every step could be reserved (else 1: an ordinary step)."""
        if self.decode_steps <= 1 or any(n != 1 for n in batch.num_new_tokens):
            return 1
        seqs = batch.seqs
        if any(not s.sampling.is_greedy or s.fork_pending
               or s.loading is not None for s in seqs):
            return 1
        num_steps = self._steps_left(seqs, 0)
        if num_steps <= 1 or not self.scheduler.reserve(seqs, num_steps):
            return 1
        return num_steps

    def run(self, batch: ScheduledBatch, num_steps: int) -> list[RequestOutput]:
        """Queue num_steps steps of a scheduled batch (its pages reserved) and read them."""
        return self._read(batch, self.runner.execute_decode_steps(batch, num_steps))

    def resume(self) -> tuple[list[RequestOutput], bool]:
        """Read the queued window, if any: (outputs, whether the batch went on, in which case
        this is the engine's step). Otherwise the caller schedules next, and may: every queued
        step has been read."""
        if self.queued is None:
            return [], False
        batch, tokens = self.queued
        self.queued = None
        if self._can_continue(batch):
            return self._read(batch, tokens), True
        # something changed since it was queued: take its tokens, queue nothing more
        return self._read(batch, tokens, may_continue=False), False

    def settle(self) -> None:
        """Wait for the queued window's steps and forget them (their tokens unread: only for
        sequences that all finished, or on the way out)."""
        if self.queued is not None:
            tokens = self.queued[1]
            self.queued = None
            tokens.step(tokens.num_steps - 1)

    def _steps_left(self, seqs: list[Sequence], ahead: int) -> int:
        """Steps to queue for seqs when `ahead` steps are queued past their tokens: none past
        max_model_len, none beyond what the longest-running request still needs."""
        return min(self.decode_steps,
                   min(self.max_model_len - s.num_tokens - ahead for s in seqs),
                   max(s.sampling.max_tokens - s.num_output_tokens - ahead for s in seqs))

    def _can_continue(self, batch: ScheduledBatch) -> bool:
        """Whether the batch's next steps may go on without scheduling: nobody waits and the
        running sequences are exactly the batch's, so none has finished or been aborted (they
        leave `running`) and no page was freed while steps of it may still write."""
        running = self.scheduler.running
        return (not self.scheduler.waiting and len(running) == len(batch.seqs)
                and set(map(id, running)) == set(map(id, batch.seqs)))

    def _continue(self, batch: ScheduledBatch) -> None:
        """Queue the batch's next window behind its last queued step (still unread)."""
        if not self.continue_windows:
            return
        num_steps = self._steps_left(batch.seqs, 1)
        if num_steps >= 1 and self.scheduler.reserve(batch.seqs, 1 + num_steps):
            tokens = self.runner.continue_decode_steps(batch, num_steps)
            if tokens is not None:
                self.queued = (batch, tokens)

    def _read(self, batch: ScheduledBatch, tokens: StepTokens, may_continue: bool = True
              ) -> list[RequestOutput]:
        """The tokens of steps queued for `batch`, a step at a time as the device finishes it
        (the host's work on step k overlaps steps k + 1...); sequences finished before
        (aborted) are skipped. With may_continue the next window is queued before the last
        step is read, if nothing changed by then."""
        seqs = batch.seqs
        new_tokens: list[list[int]] = [[] for _ in seqs]
        texts = [""] * len(seqs)
        last: list[RequestOutput | None] = [None] * len(seqs)
        live = [i for i, seq in enumerate(seqs) if not seq.is_finished]
        started = list(live)
        try:
            for k in range(tokens.num_steps):
                if may_continue and k == tokens.num_steps - 1 and self._can_continue(batch):
                    self._continue(batch)
                row = tokens.step(k)
                still = []
                for i in live:
                    if seqs[i].is_finished:  # quarantined with a sibling completion
                        continue
                    out = last[i] = self._read_token(seqs[i], row[i])
                    new_tokens[i] += out.new_token_ids
                    texts[i] += out.text_delta
                    if out.finish_reason is None:
                        still.append(i)
                live = still
        except BaseException:
            # the caller fails these requests and frees their pages: nothing queued may still
            # write into them by the time anything allocates
            tokens.step(tokens.num_steps - 1)
            self.settle()
            raise
        if not live:  # a queued window of sequences that all finished: nothing to read
            self.settle()
        outputs = []
        for i in started:
            out = last[i]
            if out is None:  # quarantined with a sibling; its end goes out next step
                continue
            outputs.append(RequestOutput(seqs[i].request_id, seqs[i].index, new_tokens[i],
                                         texts[i], out.finish_reason, out.usage, out.error))
        return outputs
