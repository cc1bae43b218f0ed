"""Runs the model over a scheduled batch: one forward (`execute`) or a window of greedy decode
steps queued at once (`execute_decode_steps`, `continue_decode_steps`); `run` picks by the
batch. Builds the paged-attention inputs, sizes the KV pool (`kv_pool.PoolPages`, which does
every page move), and on CUDA replays captured graphs (`cuda_graphs`) for decode-shaped batches.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from kvmesh.kernels import reference
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.scheduler import ScheduledBatch
from kvmesh.workers.errors import InvalidConfig
from kvmesh.workers.models.loader import LoadedModel
from kvmesh.workers.models.ops import AttentionMetadata, FusedOps
from kvmesh.workers.models.registry import model_class
from kvmesh.workers.runner.cuda_graphs import (
    DecodeGraphs,
    StepTokens,
    advance_decode_inputs,
    decode_ctas_per_sm,
    decode_kv_blocks,
    slots_from_table,
)
from kvmesh.workers.runner.kernel_ops import attention_ops, few_row_ops
from kvmesh.workers.runner.kv_pool import PoolPages
from kvmesh.workers.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 512 << 20
_GPU_ACTIVATION_RESERVE = 2 << 30


@dataclass(slots=True)
class StepLogits:
    """What one forward gives back to sample from."""

    logits: torch.Tensor  # fp32 [len(sampled), vocab]
    sampled: list[int]  # indices into batch.seqs of the sequences whose chunk reached their end


class ModelRunner:
    def __init__(self, config: WorkerConfig, loaded: LoadedModel, max_model_len: int) -> None:
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.torch_dtype_name)
        self.page_size = config.page_size
        self.max_model_len = max_model_len
        self.max_pages_per_seq = -(-max_model_len // self.page_size)
        cfg = loaded.config
        with torch.device("meta"):
            self.model = model_class(cfg)(cfg, max_positions=max_model_len)
        self.model.load_weights(loaded.state_dict, self.device, self.dtype)
        self.model.eval()
        self.model.ops = attention_ops(self.device, config.attention_backend)
        self._num_kv_splits = None
        # the batch of the last execute_decode_steps and, without graphs, its device inputs:
        # what continue_decode_steps goes on from (None after any other forward)
        self._decode_batch: ScheduledBatch | None = None
        self._eager_inputs: tuple | None = None
        if self.model.ops.paged_decode is not reference.paged_decode_ref:
            if cfg.head_dim < 16 or cfg.head_dim & (cfg.head_dim - 1):  # fail now, not per step
                raise InvalidConfig(f"the Triton attention kernels take a head_dim that is a "
                                    f"power of two >= 16; this model's is {cfg.head_dim} "
                                    "(attention_backend torch runs it)")
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
        self.pages = PoolPages(self.num_pages, self.page_shape, self.dtype, self.device)
        self.kv_pool = self.pages.kv_pool
        self.scratch_page = self.pages.scratch_page
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
                try:  # a clean device before the retry; one that cannot sync fails again
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
        # this process's share of the GPU (what it holds already, the weights, counts against
        # it), so two workers sharing a GPU at 0.45 each both get pages whichever sizes first
        free, total = torch.cuda.mem_get_info(self.device)
        share = config.gpu_memory_utilization * total - torch.cuda.memory_reserved(self.device)
        budget = min(share, free) - _GPU_ACTIVATION_RESERVE
        return max(int(budget) // self.page_nbytes, 0)

    # ------------------------------------------------------------------ forward
    def run(self, batch: ScheduledBatch) -> StepLogits | StepTokens:
        """The scheduled batch on the device: a window of batch.num_steps greedy decode steps
        (their tokens, read a step at a time) when it has more than one, else one forward."""
        if batch.num_steps > 1:
            return self.execute_decode_steps(batch, batch.num_steps)
        return self.execute(batch)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        """Run one forward over `batch` (its pages already allocated; its page moves applied
        here first): fp32 logits of the sequences whose chunk reached their last token."""
        self._decode_batch = None  # a forward here overwrites the decode inputs
        x = StepInputs.of(batch, self.page_size)
        graphs = self.graphs
        if x.rows_are_tokens and graphs is not None and graphs.fits(len(x.input_ids)):
            logits = self._graph_forward(batch, x, graphs)
            if not x.is_decode:
                logits = logits[self.pages.device_index(x.last_rows)]
            return StepLogits(logits, x.sampled)
        self.pages.move_in(batch.page_copies, batch.page_loads)
        hidden = self._eager(x)
        return StepLogits(self.model.compute_logits(hidden[self.pages.device_index(x.last_rows)]),
                          x.sampled)

    def _graph_forward(self, batch: ScheduledBatch, x: StepInputs,
                       graphs: DecodeGraphs) -> torch.Tensor:
        """Logits of every row through the decode graph; a layer run at a time while loaded
        pages are still arriving (each run replayed once its layers are in)."""
        runs = graphs.layer_runs if graphs.has_layer_runs(len(x.input_ids)) else None
        arriving = self.pages.move_in(batch.page_copies, batch.page_loads, runs)
        if arriving is not None:
            return graphs.run_by_layer_runs(x.input_ids, x.positions, x.slots, x.page_rows,
                                            x.seq_lens, arriving)
        return graphs.run(x.input_ids, x.positions, x.slots, x.page_rows, x.seq_lens)

    @torch.inference_mode()
    def execute_decode_steps(self, batch: ScheduledBatch, num_steps: int) -> StepTokens:
        """Greedy multi-step decode: `num_steps` steps over a batch of decoding sequences, each
        step's argmax fed to the next on the device; under graphs a step's tokens can be read
        while the later steps run. Every sequence's pages must already cover
        num_computed_tokens + num_steps tokens. Returns the sampled tokens, [num_steps,
        num_seqs]; the caller decides how many of them to keep."""
        self._decode_batch = None
        self.pages.move_in(batch.page_copies, batch.page_loads)
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

    def _splits(self, seq_lens: list[int]) -> int | None:
        """Split-KV count for a decode-style launch, chosen on the host (no sync per layer)
        for the keys each query attends (at most a sliding window of them)."""
        if self._num_kv_splits is None:
            return None
        spans = [self.model.config.attention_span(n) for n in seq_lens]
        return self._num_kv_splits(len(seq_lens), decode_kv_blocks(self.kv_pool),
                                   max(spans), total_tokens=sum(spans),
                                   ctas_per_sm=decode_ctas_per_sm(self.kv_pool.shape[5]))

    def _page_table(self, page_rows: list[list[int]]) -> torch.Tensor:
        """[num_rows, longest row] int32 on the device, zero-padded."""
        table = torch.zeros((len(page_rows), max(len(r) for r in page_rows)), dtype=torch.int32)
        for i, row in enumerate(page_rows):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        return table.to(self.device, non_blocking=True)

    def _eager(self, x: StepInputs) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of one forward without graphs."""
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(x.slots, dtype=torch.int64).to(dev, non_blocking=True),
            page_table=self._page_table(x.page_rows),
            seq_lens=torch.tensor(x.seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            cu_seqlens_q=torch.tensor(x.cu, dtype=torch.int32).to(dev, non_blocking=True),
            is_decode=x.rows_are_tokens,
            num_splits=self._splits(x.seq_lens) if x.rows_are_tokens else None,
        )
        ids = torch.tensor(x.input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(x.positions, dtype=torch.int64).to(dev, non_blocking=True)
        return self.model(ids, pos, meta, self.kv_pool)
