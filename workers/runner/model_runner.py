"""Runs the model over a scheduled batch: builds the paged-attention inputs, owns the KV pool,
moves pages in and out of it, and (on CUDA) replays captured graphs for decode batches.

KV pool: [num_pages + 1, num_layers, 2, page_size, num_kv_heads, head_dim] in the model dtype.
The last page is a scratch page that padded rows of a captured decode batch write into; the
block manager never hands it out.
"""

from __future__ import annotations

import gc
import logging

import torch

from kvmesh.kernels import reference
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.scheduler import ScheduledBatch
from kvmesh.workers.errors import InvalidConfig
from kvmesh.workers.models.llama import (
    AttentionMetadata,
    AttentionOps,
    FewRowOps,
    FusedOps,
    LlamaForCausalLM,
)
from kvmesh.workers.models.loader import LoadedModel
from kvmesh.workers.runner.cuda_graphs import (
    DecodeGraphs,
    StepTokens,
    advance_decode_inputs,
    decode_ctas_per_sm,
    decode_kv_blocks,
    slots_from_table,
)
from kvmesh.workers.runner.pool_copies import (
    ArrivingRows,
    SnapshotSlots,
    StagedRow,
    arriving_loads,
    runs,
    upload_layers,
    upload_pages,
)

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 512 << 20
_GPU_ACTIVATION_RESERVE = 2 << 30
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


def attention_ops(device: torch.device, backend: str = "auto") -> AttentionOps:
    """torch reference ops (CPU default) or the Triton kernels (CUDA default; on CPU they run
    under TRITON_INTERPRET=1)."""
    if backend == "torch" or (backend == "auto" and device.type == "cpu"):
        return AttentionOps(reference.write_kv_ref, reference.paged_prefill_ref,
                            reference.paged_decode_ref)
    from kvmesh.kernels.cache_write import write_kv
    from kvmesh.kernels.paged_decode import paged_decode
    from kvmesh.kernels.paged_prefill import paged_prefill

    return AttentionOps(write_kv, paged_prefill, paged_decode)


def few_row_ops(device: torch.device) -> FewRowOps:
    """Skinny matmuls for forwards of up to 64 tokens (decode steps, short chunks). In fp32 they
    multiply exactly ("ieee" dots, slower than cuBLAS' fp32 but an fp32 model is for testing);
    on CPU they run under Triton's interpreter."""
    from kvmesh.kernels.cache_write import rope_write_kv
    from kvmesh.kernels.skinny_gemm import SkinnyLinears

    linears = SkinnyLinears(8)  # CPU: the interpreter; any small grid will do
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        linears = SkinnyLinears(props.multi_processor_count,
                                shared_memory=props.shared_memory_per_block_optin)
    return FewRowOps(linears.max_rows, linears.linear, linears.linear_partials, linears.gated,
                     rope_write_kv)


class ModelRunner:
    def __init__(self, config: WorkerConfig, loaded: LoadedModel, max_model_len: int) -> None:
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.torch_dtype_name)
        self.page_size = config.page_size
        self.max_model_len = max_model_len
        self.max_pages_per_seq = -(-max_model_len // self.page_size)
        cfg = loaded.config
        with torch.device("meta"):
            self.model = LlamaForCausalLM(cfg, max_positions=max_model_len)
        self.model.load_weights(loaded.state_dict, self.device, self.dtype)
        self.model.eval()
        self.model.ops = attention_ops(self.device, config.attention_backend)
        self._num_kv_splits = None
        # the batch of the last execute_decode_steps and, without graphs, its device inputs:
        # what continue_decode_steps goes on from (None after any other forward)
        self._decode_batch: ScheduledBatch | None = None
        self._eager_inputs: tuple | None = None
        # pinned rows for store write-through snapshots (the engine sets them on CUDA)
        self.snapshots: SnapshotSlots | None = None
        if self.model.ops.paged_decode is not reference.paged_decode_ref:
            from kvmesh.kernels.fused import rms_norm, silu_and_mul
            from kvmesh.kernels.paged_decode import num_kv_splits
            from kvmesh.kernels.rotary import rotary

            self._num_kv_splits = num_kv_splits
            self.model.set_fused(FusedOps(rms_norm, rotary, silu_and_mul,
                                          few_row_ops(self.device)))
        self.page_shape = (cfg.num_layers, 2, self.page_size, cfg.num_kv_heads, cfg.head_dim)
        self.page_nbytes = self.dtype.itemsize
        for dim in self.page_shape:
            self.page_nbytes *= dim
        self.num_pages = self._num_pages(config)
        if self.num_pages < 2:
            raise InvalidConfig(f"KV budget holds {self.num_pages} pages of {self.page_nbytes} "
                                "bytes; need at least 2")
        self.scratch_page = self.num_pages
        self.kv_pool = torch.zeros((self.num_pages + 1, *self.page_shape), dtype=self.dtype,
                                   device=self.device)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = self._capture(config.max_num_seqs, max_model_len)

    def _capture(self, max_num_seqs: int, max_model_len: int) -> DecodeGraphs | None:
        """The decode graphs; None where capture fails twice (a backend that cannot be
        captured still runs eagerly). Garbage is collected before, not during, capture: an
        earlier engine's CUDA objects freed mid-capture could invalidate it."""
        was_enabled = gc.isenabled()
        for attempt in (1, 2):
            gc.collect()
            gc.disable()
            try:
                return DecodeGraphs(self.model, self.kv_pool, max_num_seqs,
                                    self.max_pages_per_seq, self.scratch_page, max_model_len)
            except Exception as exc:
                log.warning("CUDA graph capture failed (attempt %d of 2)%s: %s", attempt,
                            ", decoding eagerly" if attempt == 2 else "", exc)
                try:  # settle before the retry; one that cannot settle fails again
                    torch.cuda.synchronize(self.device)
                except RuntimeError:
                    pass
            finally:
                if was_enabled:
                    gc.enable()
        return None

    def _num_pages(self, config: WorkerConfig) -> int:
        if config.kv_cache_bytes is not None:
            return config.kv_cache_bytes // self.page_nbytes
        if self.device.type == "cpu":
            return CPU_DEFAULT_KV_BYTES // self.page_nbytes
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - config.gpu_memory_utilization) * total - _GPU_ACTIVATION_RESERVE
        return max(int(budget) // self.page_nbytes, 0)

    # ------------------------------------------------------------------ pages
    def read_page(self, page_id: int) -> memoryview:
        """A host copy of one page's payload ([num_layers, 2, page_size, kv_heads, head_dim])."""
        page = self.kv_pool[page_id].to("cpu", copy=True).contiguous()
        return memoryview(page.view(torch.uint8).numpy()).cast("B")

    def snapshot_pages(self, page_ids: list[int]
                       ) -> tuple[list[torch.Tensor], list[int] | None, torch.cuda.Event | None]:
        """Start copying pages to host memory without waiting: (one host row per page, the
        `snapshots` slots holding them, to give back once read, and an event that completes with
        the copies, None on CPU). Rows go into the slots (pinned on CUDA), one copy per run of
        consecutive pages and slots; fewer rows than pages when the slots run out. Without slots
        (the CPU default) the copies are plain and done on return."""
        if self.snapshots is None:
            return list(self.kv_pool[page_ids].cpu().unbind()), None, None
        slots = self.snapshots.take(len(page_ids))
        rows = self.snapshots.rows
        if not slots or rows is None:  # none free, or the arena could not be allocated
            return [], [], None
        for run in runs(len(slots), lambda i: page_ids[i] == page_ids[i - 1] + 1
                        and slots[i] == slots[i - 1] + 1):
            page, slot = page_ids[run.start], slots[run.start]
            rows[slot : slot + len(run)].copy_(self.kv_pool[page : page + len(run)],
                                               non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return [rows[slot] for slot in slots], slots, event

    def enable_snapshot_slots(self, max_nbytes: int) -> None:
        """Pinned rows for store write-through snapshots (CUDA only; CPU copies are plain), at
        most the pool's size, pinned on a background thread."""
        if self.device.type == "cuda" and self.snapshots is None:
            nbytes = min(max_nbytes, self.num_pages * self.page_nbytes)
            self.snapshots = SnapshotSlots(self.page_shape, self.dtype, nbytes)
            self.snapshots.start()

    def release_snapshots(self, slots: list[int]) -> None:
        if self.snapshots is not None:
            self.snapshots.give_back(slots)

    def write_pages(self, loads: list[tuple[int, StagedRow]]) -> None:
        """Staged pages (rows of kv_upload.PageStager tensors, or of ArrivingRows: waited for
        whole) into pool pages; asynchronous on CUDA."""
        upload_pages(self.kv_pool, [page_id for page_id, _ in loads], [row for _, row in loads])

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.kv_pool[dst].copy_(self.kv_pool[src])

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one forward over `batch` (its pages already allocated; loads and copies applied
        here first). Returns (fp32 logits [num_sampled, vocab], indices into batch.seqs of the
        sequences whose chunk reached their last token, i.e. that get a new token)."""
        self._decode_batch = None  # a forward here overwrites the decode inputs
        ps = self.page_size
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
        last_rows = [cu[i + 1] - 1 for i in sampled]
        # short chunks (a prefix hit's suffix, decodes): every token a decode row
        rows_are_tokens = max(batch.num_new_tokens) <= SHORT_CHUNK_TOKENS
        if rows_are_tokens and not is_decode:
            page_rows, seq_lens = _one_row_per_token(page_rows, seq_lens, cu)
        graphs = self.graphs
        if rows_are_tokens and graphs is not None and graphs.fits(len(input_ids)):
            arriving = arriving_loads(batch.page_loads, graphs.segments) \
                if graphs.has_segments(len(input_ids)) else []
            if arriving:  # each run of layers computes once those layers are in
                self.copy_pages(batch.page_copies)
                self.write_pages([load for load in batch.page_loads
                                  if not isinstance(load[1][0], ArrivingRows)])
                targets = [(source, self._index(ids)) for source, ids in arriving]
                logits = graphs.run_segments(
                    input_ids, positions, slots, page_rows, seq_lens,
                    lambda segment: [upload_layers(self.kv_pool, ids, source, segment)
                                     for source, ids in targets])
            else:
                self._apply_page_moves(batch)
                logits = graphs.run(input_ids, positions, slots, page_rows, seq_lens)
            return (logits if is_decode else logits[self._index(last_rows)]), sampled
        self._apply_page_moves(batch)
        hidden = self._eager(input_ids, positions, slots, page_rows, seq_lens, cu,
                             rows_are_tokens)
        return self.model.compute_logits(hidden[self._index(last_rows)]), sampled

    @torch.inference_mode()
    def execute_decode_steps(self, batch: ScheduledBatch, num_steps: int) -> StepTokens:
        """Greedy multi-step decode: `num_steps` steps over a batch of decoding sequences, each
        step's argmax fed to the next on the device; under graphs a step's tokens can be read
        while the later steps run. Every sequence's pages must already cover
        num_computed_tokens + num_steps tokens. Returns the sampled tokens, [num_steps,
        num_seqs]; the caller decides how many of them to keep."""
        self._decode_batch = None
        self._apply_page_moves(batch)
        ps = self.page_size
        seqs = batch.seqs
        positions = [seq.num_computed_tokens for seq in seqs]
        input_ids = [seq.token_ids[p] for seq, p in zip(seqs, positions, strict=True)]
        slots = [seq.page_ids[p // ps] * ps + p % ps for seq, p in zip(seqs, positions,
                                                                        strict=True)]
        seq_lens = [p + 1 for p in positions]
        page_rows = [seq.page_ids for seq in seqs]
        if self.graphs is not None and self.graphs.fits(len(seqs)) and \
                num_steps <= self.graphs.max_steps:
            tokens = self.graphs.run_steps(input_ids, positions, slots, page_rows, seq_lens,
                                           num_steps)
            self._decode_batch, self._eager_inputs = batch, None
            return tokens
        dev = self.device
        n = len(seqs)
        inputs = (torch.tensor(input_ids, dtype=torch.int64, device=dev),
                  torch.tensor(positions, dtype=torch.int64, device=dev),
                  torch.tensor(slots, dtype=torch.int64, device=dev),
                  torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                  torch.ones(n, dtype=torch.int64, device=dev), seq_lens)
        tokens = self._eager_steps(inputs, self._page_table(page_rows), num_steps)
        self._decode_batch, self._eager_inputs = batch, inputs
        return tokens

    @torch.inference_mode()
    def continue_decode_steps(self, batch: ScheduledBatch, num_steps: int) -> StepTokens | None:
        """`num_steps` more greedy steps of the batch of the last execute_decode_steps, from
        where its steps (maybe still running) leave it: no host round trip between them. Each
        sequence's pages must cover num_computed_tokens + all queued steps + num_steps. None if
        anything ran in between (then start over with execute_decode_steps)."""
        if self._decode_batch is not batch:
            return None
        page_rows = [seq.page_ids for seq in batch.seqs]
        if self._eager_inputs is None:
            assert self.graphs is not None
            return self.graphs.continue_steps(page_rows, num_steps)
        _, pos, slot_mapping, *_ = self._eager_inputs
        table = self._page_table(page_rows)
        slots_from_table(pos, table, self.page_size, out=slot_mapping)
        return self._eager_steps(self._eager_inputs, table, num_steps)

    def _eager_steps(self, inputs: tuple, table: torch.Tensor, num_steps: int) -> StepTokens:
        """Decode steps without graphs; inputs (ids, positions, slots, seq_lens, step, host
        seq_lens) are advanced in place for the next call."""
        ids, pos, slot_mapping, lens, step, host_lens = inputs
        n = ids.shape[0]
        cu = torch.arange(n + 1, dtype=torch.int32, device=self.device)
        tokens = torch.empty((num_steps, n), dtype=torch.int64, device=self.device)
        for k in range(num_steps):
            meta = AttentionMetadata(slot_mapping, table, lens, cu, True,
                                     self._splits(host_lens))
            hidden = self.model(ids, pos, meta, self.kv_pool)
            tokens[k] = self.model.compute_logits(hidden).argmax(dim=-1)
            advance_decode_inputs(tokens[k], ids, pos, lens, slot_mapping, table, step,
                                  self.page_size)
            host_lens[:] = [x + 1 for x in host_lens]
        return StepTokens(tokens.cpu())

    def _apply_page_moves(self, batch: ScheduledBatch) -> None:
        # copies first: a copy's source may be freed (preemption) and reused as a load target
        self.copy_pages(batch.page_copies)
        self.write_pages(batch.page_loads)

    def _splits(self, seq_lens: list[int]) -> int | None:
        """Split-KV count for a decode-style launch, chosen on the host (no sync per layer)."""
        if self._num_kv_splits is None:
            return None
        return self._num_kv_splits(len(seq_lens), decode_kv_blocks(self.kv_pool),
                                   max(seq_lens), total_tokens=sum(seq_lens),
                                   ctas_per_sm=decode_ctas_per_sm(self.kv_pool.shape[5]))

    def _index(self, rows: list[int]) -> torch.Tensor:
        """An int64 index on the device, copied from page-locked memory without waiting for the
        step queued before it (a list index, or a blocking copy, would wait for the whole
        step: the CPU then could not do its bookkeeping meanwhile)."""
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        return index.to(self.device, non_blocking=True)

    def _page_table(self, page_rows: list[list[int]]) -> torch.Tensor:
        """[num_rows, longest row] int32 on the device, zero-padded."""
        table = torch.zeros((len(page_rows), max(len(r) for r in page_rows)), dtype=torch.int32)
        for i, row in enumerate(page_rows):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        return table.to(self.device, non_blocking=True)

    def _eager(self, input_ids: list[int], positions: list[int], slots: list[int],
               page_rows: list[list[int]], seq_lens: list[int], cu: list[int],
               is_decode: bool) -> torch.Tensor:
        """is_decode: one attention row per token (page_rows / seq_lens given per token)."""
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            page_table=self._page_table(page_rows),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32).to(dev, non_blocking=True),
            is_decode=is_decode,
            num_splits=self._splits(seq_lens) if is_decode else None,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return self.model(ids, pos, meta, self.kv_pool)
