"""CUDA graphs of the decode step, one per padded batch size.

Fixed buffers (gpt-fast style) make capture possible: input ids, positions, slot mapping, a page
table as wide as max_model_len, and seq lens. A batch is padded up to the next captured size;
padded rows write into the scratch page and attend over one token of it.

One graph is a whole greedy step: forward, logits (model dtype), argmax (kernels/argmax.py), and
the inputs of the next step advanced on the device (`advance_decode_inputs`). A run of several
steps is then back-to-back replays with no host work between them (multi-step decode); a single
step reads the logits.

Batches of up to LAYER_RUN_MAX_ROWS rows (a prefix hit's suffix, with the decodes beside it) are
also captured as one graph per layer run (`pool_copies.layer_runs`), replayed in order with the
pool's moves between them (`run_by_layer_runs`): a step whose prefix pages are still arriving
waits for each layer run just before the graph that reads them.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmesh.workers.models.causal_lm import CausalLM, LayerState
from kvmesh.workers.models.ops import AttentionMetadata, AttentionOps
from kvmesh.workers.runner.kv_pool import LayerRunLoads
from kvmesh.workers.runner.pool_copies import layer_runs

# padded batch sizes also captured as one graph per layer run (pool_copies.layer_runs)
LAYER_RUN_MAX_ROWS = 16


def decode_ctas_per_sm(head_dim: int) -> int:
    """Resident decode programs per SM to size split-KV for (kernels.num_kv_splits). Measured
    on the H200 at batch 32/64, contexts 1K-8K (benchmarks/RESULTS.md, Engine): head_dim 128
    is fastest with 2 splits at batch 32 (44 vs 50 us), unsplit at batch 64; head_dim 64 (two
    KV heads a program) with 6 splits at batch 32 (23.7 us a layer against 26.1 at 4, 1,152-token
    context; the whole step took 1.241 ms at 6, 1.293 at 4, 1.359 at 8)."""
    return 6 if head_dim <= 64 else 4


def decode_kv_blocks(kv_pool: torch.Tensor) -> int:
    """Decode programs per sequence and split over kv_pool (its default decode config's)."""
    from kvmesh.kernels.paged_decode import DecodeConfig

    return DecodeConfig.for_head_dim(kv_pool.shape[5]).kv_blocks(kv_pool.shape[4])


def advance_decode_inputs(next_tokens: torch.Tensor, input_ids: torch.Tensor,
                          positions: torch.Tensor, seq_lens: torch.Tensor,
                          slot_mapping: torch.Tensor, page_table: torch.Tensor,
                          step: torch.Tensor, page_size: int) -> None:
    """Turn one decode step's inputs into the next step's, on the device (mutates every input
    but next_tokens). Rows with step 0 (padding) keep position 0 in their scratch page; a
    position past the table's last column reads that column (the result is never used: the
    caller reserved pages for every step it runs).
    next_tokens, input_ids, positions, slot_mapping, step: [n] int64; seq_lens: [n] int32;
    page_table: [n, width] int32."""
    input_ids.copy_(next_tokens)
    positions.add_(step)
    seq_lens.add_(step.to(torch.int32))
    slots_from_table(positions, page_table, page_size, out=slot_mapping)


def slots_from_table(positions: torch.Tensor, page_table: torch.Tensor, page_size: int, *,
                     out: torch.Tensor) -> None:
    """out[i] = the pool slot of token positions[i] of row i of page_table (a position past
    the table's last column reads that column)."""
    column = (positions // page_size).clamp_(max=page_table.shape[1] - 1)
    page = page_table.gather(1, column.unsqueeze(1)).squeeze(1)
    out.copy_(page.to(torch.int64) * page_size + positions % page_size)


class StepTokens:
    """The tokens of a multi-step decode, [num_steps, num_seqs], readable a step at a time: a
    step's row waits only for its own event (none for tokens already on the host)."""

    def __init__(self, tokens: torch.Tensor, events: list[torch.cuda.Event] | None = None
                 ) -> None:
        self.tokens = tokens
        self.events = events
        self.num_steps = tokens.shape[0]

    def step(self, k: int) -> list[int]:
        if self.events is not None:
            self.events[k].synchronize()
        return self.tokens[k].tolist()


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_pool: torch.Tensor, max_num_seqs: int,
                 max_pages_per_seq: int, scratch_page: int, max_model_len: int) -> None:
        from kvmesh.kernels.argmax import argmax_rows
        from kvmesh.kernels.paged_decode import DecodeWorkspace, num_kv_splits

        self.model = model
        self.kv_pool = kv_pool
        self.page_size = kv_pool.shape[3]
        self.scratch_slot = scratch_page * self.page_size
        self.scratch_page = scratch_page
        dev = kv_pool.device
        n = max_num_seqs
        # rows: input ids, positions, slot mapping, seq lens (copied into the int32 seq_lens),
        # position step (1 for a sequence, 0 for padding)
        self._dev_inputs = torch.zeros((5, n), dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping = self._dev_inputs[:3]
        self.step = self._dev_inputs[4]
        self._host_inputs_t = torch.zeros((5, n), dtype=torch.int64, pin_memory=True)
        self._host_inputs = self._host_inputs_t.numpy()
        self._pad_row = np.array([[0], [0], [self.scratch_slot], [1], [0]], dtype=np.int64)
        self._host_table_t = torch.zeros((n, max_pages_per_seq), dtype=torch.int32,
                                         pin_memory=True)
        self._host_table = self._host_table_t.numpy()
        self._dev_inputs[2].fill_(self.scratch_slot)
        self._dev_inputs[3].fill_(1)
        self._seq_lens64 = self._dev_inputs[3]
        self.page_table = torch.full((n, max_pages_per_seq), scratch_page, dtype=torch.int32,
                                     device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)  # filled from row 3
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._argmax = argmax_rows
        self.logits: dict[int, torch.Tensor] = {}  # [bs, vocab] in the model dtype
        self.next_tokens: dict[int, torch.Tensor] = {}  # [bs] int64, the argmax of logits
        # small batches (a prefix hit's suffix) are also captured as one graph per layer run,
        # so a step can start while the hit's last layers are still arriving
        self.layer_runs = layer_runs(model.config.num_layers)
        self.layer_run_graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.layer_run_logits: dict[int, torch.Tensor] = {}
        self._layer_run_states: dict[int, LayerState] = {}  # their hidden states, kept alive
        self.max_steps = 64
        # each step's tokens land in page-locked memory with an event, so the host reads a
        # step's tokens while the device runs the next steps
        # two banks: a continuation's steps are queued while the host still reads the last
        # steps of the run before it
        self._host_tokens = torch.zeros((2, self.max_steps, n), dtype=torch.int64,
                                        pin_memory=True)
        self._step_events = [[torch.cuda.Event() for _ in range(self.max_steps)]
                             for _ in range(2)]
        self._bank = 0
        self._loaded = 0  # batch size of the inputs on the device (0: none to continue from)
        # recorded after the staging buffers' copies: the host waits on it before it writes
        # them again, so a copy still queued behind earlier work never reads the next batch's
        self._staged = torch.cuda.Event()
        self._row_lens: list[int] = []  # pages of each row written to the device table
        base_ops = model.ops
        assert base_ops is not None
        pool = torch.cuda.graph_pool_handle()
        # split-KV merge counters, one set per layer, all zeroed by one memset at the start of
        # each step instead of a fill kernel per layer (the partials are graph memory per call)
        cfg = model.config
        self._counters = counters = torch.zeros((cfg.num_layers, n, cfg.num_heads),
                                                dtype=torch.int32, device=dev)
        # a query attends at most this many keys (a sliding window caps it on every layer)
        span = cfg.attention_span(max_model_len)
        for bs in reversed(self.sizes):
            splits = num_kv_splits(bs, decode_kv_blocks(kv_pool), span,
                                   ctas_per_sm=decode_ctas_per_sm(kv_pool.shape[5]))

            def decode(q, pool_, layer, table, lens, scale, sliding_window=None, _splits=splits):
                rows, heads, dim = q.shape
                workspace = DecodeWorkspace(
                    q.new_empty((rows, heads, _splits, dim), dtype=torch.float32),
                    q.new_empty((rows, heads, _splits), dtype=torch.float32), counters[layer])
                return base_ops.paged_decode(q, pool_, layer, table, lens, scale,
                                             num_splits=_splits, workspace=workspace,
                                             sliding_window=sliding_window)

            model.ops = AttentionOps(base_ops.write_kv, base_ops.paged_prefill, decode)
            try:
                meta = AttentionMetadata(self.slot_mapping[:bs], self.page_table[:bs],
                                         self.seq_lens[:bs], self.cu[: bs + 1], True)
                with torch.inference_mode():
                    for _ in range(2):  # compile the kernels and warm the allocator
                        self._step(bs, meta)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: the store writer and the pinned-memory threads may call CUDA
                    # from their threads meanwhile
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        logits, next_tokens = self._step(bs, meta)
                self.graphs[bs] = graph
                self.logits[bs] = logits
                self.next_tokens[bs] = next_tokens
                if bs <= LAYER_RUN_MAX_ROWS and len(self.layer_runs) > 1:
                    self._capture_layer_runs(bs, meta, pool)
            finally:
                model.ops = base_ops
        torch.cuda.synchronize()

    def _capture_layer_runs(self, bs: int, meta: AttentionMetadata, pool: tuple) -> None:
        """The step of batch size bs as one graph per layer run (the first also embeds the
        tokens, the last also samples and advances the inputs), replayed in order."""
        graphs = []
        state = None
        with torch.inference_mode():
            for index, layers in enumerate(self.layer_runs):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    if state is None:
                        self._counters.zero_()
                        state = self.model.start(self.input_ids[:bs], self.positions[:bs])
                    self.model.run_layers(state, layers, meta, self.kv_pool)
                    if index == len(self.layer_runs) - 1:
                        self.layer_run_logits[bs] = self._finish(bs, state)[0]
                graphs.append(graph)
        assert state is not None
        self.layer_run_graphs[bs] = graphs
        self._layer_run_states[bs] = state

    def _step(self, bs: int, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        self._counters.zero_()
        state = self.model.start(self.input_ids[:bs], self.positions[:bs])
        self.model.run_layers(state, range(self.model.config.num_layers), meta, self.kv_pool)
        return self._finish(bs, state)

    def _finish(self, bs: int, state: LayerState) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.finish(state)
        logits = self.model.logits(hidden)
        next_tokens = self._argmax(logits)
        advance_decode_inputs(next_tokens, self.input_ids[:bs], self.positions[:bs],
                              self.seq_lens[:bs], self.slot_mapping[:bs], self.page_table[:bs],
                              self.step[:bs], self.page_size)
        return logits, next_tokens

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, input_ids: list[int], positions: list[int], slots: list[int],
            page_rows: list[list[int]], seq_lens: list[int]) -> torch.Tensor:
        """fp32 logits [num_seqs, vocab] of one decode step (for an fp32 model a view of the
        graph's output buffer, valid until the next replay)."""
        bs = self._load(input_ids, positions, slots, page_rows, seq_lens)
        self.graphs[bs].replay()
        return self.logits[bs][: len(input_ids)].float()

    def has_layer_runs(self, num_seqs: int) -> bool:
        return self._size(num_seqs) in self.layer_run_graphs

    def run_by_layer_runs(self, input_ids: list[int], positions: list[int], slots: list[int],
                          page_rows: list[list[int]], seq_lens: list[int],
                          loads: LayerRunLoads) -> torch.Tensor:
        """`run` through the graphs of layer runs, each replayed once `loads` has queued the
        move of its layers (layers layer_runs[k]) of the pages still arriving."""
        bs = self._load(input_ids, positions, slots, page_rows, seq_lens)
        for index, graph in enumerate(self.layer_run_graphs[bs]):
            loads.wait(index)
            graph.replay()
        return self.layer_run_logits[bs][: len(input_ids)].float()

    def run_steps(self, input_ids: list[int], positions: list[int], slots: list[int],
                  page_rows: list[list[int]], seq_lens: list[int],
                  num_steps: int) -> StepTokens:
        """Greedy tokens of `num_steps` decode steps, each fed to the next on the device, all
        queued at once and read a step at a time. The rows' pages must cover every step; the
        returned tokens are valid until the call after next (run_steps or continue_steps)."""
        bs = self._load(input_ids, positions, slots, page_rows, seq_lens)
        return self._queue_steps(bs, len(input_ids), num_steps)

    def continue_steps(self, page_rows: list[list[int]], num_steps: int) -> StepTokens:
        """`num_steps` more steps of the batch the last run_steps loaded, from where its queued
        steps leave the inputs (they may still be running). The rows are that batch's page
        lists, grown in place to cover the new steps; only the new pages are sent, ahead of
        the steps that use them."""
        bs = self._loaded
        assert bs and len(page_rows) <= bs and len(page_rows) == len(self._row_lens)
        table = self._host_table
        self._staged.synchronize()
        for i, row in enumerate(page_rows):
            table[i, self._row_lens[i] : len(row)] = row[self._row_lens[i] :]
            self._row_lens[i] = len(row)
        self.page_table[:bs].copy_(self._host_table_t[:bs], non_blocking=True)
        self._staged.record()
        # the last queued step computed the next slots from the table as it was then
        slots_from_table(self.positions[:bs], self.page_table[:bs], self.page_size,
                         out=self.slot_mapping[:bs])
        return self._queue_steps(bs, len(page_rows), num_steps)

    def _queue_steps(self, bs: int, num_seqs: int, num_steps: int) -> StepTokens:
        assert 1 <= num_steps <= self.max_steps
        self._bank ^= 1
        tokens, events = self._host_tokens[self._bank], self._step_events[self._bank]
        graph = self.graphs[bs]
        for k in range(num_steps):
            graph.replay()
            tokens[k, :bs].copy_(self.next_tokens[bs], non_blocking=True)
            events[k].record()
        return StepTokens(tokens[:num_steps, :num_seqs], events[:num_steps])

    def _size(self, num_seqs: int) -> int:
        """The captured batch size a batch of num_seqs is padded to."""
        return next(s for s in self.sizes if s >= num_seqs)

    def _load(self, input_ids: list[int], positions: list[int], slots: list[int],
              page_rows: list[list[int]], seq_lens: list[int]) -> int:
        """Stage one step's inputs into the graph buffers; returns the padded batch size."""
        num_seqs = len(input_ids)
        bs = self._size(num_seqs)
        # one staging row per input, padded for the captured size, sent in one copy:
        # ids, positions, slots, seq_lens
        host = self._host_inputs
        self._staged.synchronize()
        host[:, :bs] = self._pad_row
        host[0, :num_seqs] = input_ids
        host[1, :num_seqs] = positions
        host[2, :num_seqs] = slots
        host[3, :num_seqs] = seq_lens
        host[4, :num_seqs] = 1
        self._dev_inputs[:, :bs].copy_(self._host_inputs_t[:, :bs], non_blocking=True)
        width = max(len(r) for r in page_rows)
        table = self._host_table
        table[:bs, :width] = self.scratch_page
        for i, row in enumerate(page_rows):
            table[i, : len(row)] = row
        # whole rows: one contiguous copy from page-locked memory (a column slice would go
        # through a pageable temporary, which waits for the device). Columns past a row's pages
        # are never read: attention stops at seq_len, and padding rows stay in column 0.
        self.page_table[:bs].copy_(self._host_table_t[:bs], non_blocking=True)
        self._staged.record()
        self.seq_lens[:bs].copy_(self._seq_lens64[:bs])  # int64 staging row -> int32 input
        self._loaded = bs
        self._row_lens = [len(row) for row in page_rows]
        return bs
