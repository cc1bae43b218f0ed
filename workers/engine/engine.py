"""The worker engine: requests in, tokens out, one `step()` at a time.

A step is schedule (scheduler: which sequences, which pages, one step or a window of greedy
decode steps) -> execute (model runner: page moves, the forward or the queued window) ->
postprocess (finish the prefix loads the step computed on, register full pages in the prefix
cache and save them through the KV connector, sample, detokenize, stop). Single-threaded: the
caller drives step(); the connector runs a thread of its own (the store writer).
"""

from __future__ import annotations

import logging

from kvmesh.cachestore.keys import Namespace, SaltedNamespaces, tokens_to_bytes
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.block_manager import BlockManager
from kvmesh.workers.engine.completions import Completions
from kvmesh.workers.engine.detokenizer import IncrementalDetokenizer
from kvmesh.workers.engine.outputs import RequestOutput
from kvmesh.workers.engine.reports import EngineReports
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.engine.scheduler import ScheduledBatch, Scheduler
from kvmesh.workers.engine.sequence import Sequence
from kvmesh.workers.models.loader import LoadedModel, load_model
from kvmesh.workers.offload.connector import PageStore
from kvmesh.workers.offload.host_offload import KvOffload
from kvmesh.workers.runner.cuda_graphs import StepTokens
from kvmesh.workers.runner.model_runner import ModelRunner, StepLogits
from kvmesh.workers.runner.sampler import make_generator, sample, sample_each

log = logging.getLogger(__name__)

# every store call; a prefix of max_model_len pages moves well inside it on loopback
STORE_TIMEOUT_S = 3.0
_GRAPH_DECODE_STEPS = 8
MAX_TENANT_NAMESPACES = 1024  # salted namespaces kept built; salts come from callers
_HOST_COPY_BYTES = 2 << 30  # pinned rows for store write-through (two 8K-token 8B prefills)


class Engine(Completions, EngineReports):
    offload: KvOffload

    def __init__(self, config: WorkerConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        loaded = loaded if loaded is not None else load_model(config.model)
        cfg = loaded.config
        self.model_config = cfg
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.model_id
        self.page_size = config.page_size
        limit = cfg.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.runner = ModelRunner(config, loaded, self.max_model_len)
        self.offload = KvOffload.for_pool(self.runner.pages, config.host_tier_bytes,
                                          self.max_model_len, self.page_size)
        if config.store:
            from kvmesh.cachestore.client.store_client import (
                StoreClient,  # needs the generated gRPC code
            )

            # a slow store must cost a miss, not a stall: short deadlines, and the client's
            # circuit breaker skips the store for a while after a few calls in a row fail
            self.attach_store(StoreClient(config.store, config.store_token, timeout=STORE_TIMEOUT_S,
                                          **self.offload.segment_hooks()))
        on_evict = self.offload.on_evict if self.offload.host is not None else None
        self.block_manager = BlockManager(self.runner.num_pages, self.page_size, on_evict)
        has_graphs = self.runner.graphs is not None
        steps = config.decode_steps
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.offload,
            steps if steps is not None else (_GRAPH_DECODE_STEPS if has_graphs else 1),
            self.max_model_len)
        self.scheduler.continue_windows = has_graphs
        # a window of decode steps queued on the device by the last step, not read yet
        self.queued_window: tuple[ScheduledBatch, StepTokens] | None = None
        # the weights' fingerprint field carries the model fingerprint: weights and the
        # config's KV identity (architecture, shapes, RoPE, ...), so two models never mix pages
        self._base_namespace = Namespace(
            model=self.model_name, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, dtype=config.torch_dtype_name, page_size=self.page_size,
            weights_fingerprint=loaded.model_fingerprint,
            tokenizer_fingerprint=loaded.tokenizer_fingerprint)
        self.tenant_namespaces = SaltedNamespaces(MAX_TENANT_NAMESPACES)
        super().__init__()
        self._arrivals = 0
        self.eos_token_ids = set(cfg.eos_token_ids)

    # ------------------------------------------------------------------ requests
    def attach_store(self, store: PageStore) -> None:
        """Use a connected store client as the remote tier; a StoreClient made for it should
        take `offload.segment_hooks()` (so its segments are page-locked). `config.store` comes
        here too."""
        self.offload.attach_store(store)
        self.runner.pages.enable_host_copies(_HOST_COPY_BYTES)
        self.offload.warm_up_store_loads()

    def namespace(self, tenant_salt: str = "") -> Namespace:
        return self.tenant_namespaces.get(self._base_namespace, tenant_salt)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling: SamplingParams, tenant_salt: str = "") -> None:
        """Queue a request; raises InvalidRequest for an empty or too long prompt, bad params
        or a duplicate id. Nothing is queued when it raises."""
        ids = self._check_request(request_id, prompt_token_ids, sampling,
                                  self.model_config.vocab_size, self.page_size,
                                  self.runner.num_pages)
        seq = Sequence(request_id, 0, list(prompt_token_ids), len(prompt_token_ids), sampling,
                       self.namespace(tenant_salt), arrival=self._arrivals,
                       fork_pending=sampling.n > 1, prompt_bytes=tokens_to_bytes(ids))
        self._arrivals += 1
        self._track(seq)
        self._requests[request_id] = [seq]
        self.scheduler.add(seq)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self.queued_window is not None:  # read before anything is scheduled (Scheduler)
            batch, tokens = self.queued_window
            self.queued_window = None
            went_on = self.scheduler.window_goes_on(batch)
            outputs = self._postprocess(batch, tokens, outputs)
            if went_on:  # reading it was this step (it may have queued the next window)
                return outputs
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return outputs
        output, rewound = self._execute(batch, outputs)
        return self._postprocess(batch, output, outputs, rewound)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """Run the prompts to completion; returns completion 0's token ids of each prompt."""
        ids = [f"generate-{self._arrivals}-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, sampling)
        results: dict[str, list[int]] = {request_id: [] for request_id in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.request_id in results and out.index == 0:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[request_id] for request_id in ids]

    def _execute(self, batch: ScheduledBatch, outputs: list[RequestOutput]
                 ) -> tuple[StepLogits | StepTokens, set[int] | frozenset[int]]:
        """Run the batch on the device, then finish the prefix loads it computed on: (what the
        runner gave, the seq_ids rewound to before a bad loaded page)."""
        try:
            output = self.runner.run(batch)
            return output, self.scheduler.finish_loads()
        except Exception as exc:  # no single request explains it: the batch fails, others go on
            raise self._fail_batch(batch.seqs, exc, outputs) from exc
        except BaseException:  # the caller fails these requests; no load may stay in flight
            self.scheduler.drop_loads(batch.seqs)
            raise

    def _postprocess(self, batch: ScheduledBatch, output: StepLogits | StepTokens,
                     outputs: list[RequestOutput], rewound: set[int] | frozenset[int] = frozenset()
                     ) -> list[RequestOutput]:
        """The step's tokens into their sequences (appended to `outputs`, returned)."""
        if isinstance(output, StepTokens):
            try:
                return outputs + self._read_window(batch, output)
            except Exception as exc:  # the window drained the device before it raised
                raise self._fail_batch(batch.seqs, exc, outputs) from exc
        logits, sampled = output.logits, output.sampled
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            # pages loaded for it were computed on before their checks finished: a bad one
            # rewinds it (the next steps compute from there), and this step's token is dropped
            if seq.seq_id in rewound:
                continue
            seq.num_computed_tokens += num_new
            self._register_full_pages(seq)
        if rewound:
            keep = [j for j, i in enumerate(sampled) if batch.seqs[i].seq_id not in rewound]
            logits, sampled = logits[keep], [sampled[j] for j in keep]
        rows = [batch.seqs[i] for i in sampled]
        tokens = sample_each(logits, [s.sampling for s in rows],
                             [self._generators.get(s.seq_id) for s in rows])
        for row, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            if seq.is_finished:  # a completion of a request quarantined earlier in this loop
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                if seq.fork_pending:
                    outputs += self._fork(seq, logits[row : row + 1])
                outputs.append(self._append(seq, token))
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                outputs += self._quarantine(seq.request_id, exc)
        return outputs

    def _read_window(self, batch: ScheduledBatch, tokens: StepTokens) -> list[RequestOutput]:
        """The tokens of a window of steps queued for `batch`, a step at a time as the device
        finishes it (the host's work on step k overlaps steps k + 1...), one output per
        sequence; sequences finished before (aborted) are skipped. Before the last step is
        read, the next window is queued behind it if the batch is unchanged by then."""
        seqs = batch.seqs
        new_tokens: list[list[int]] = [[] for _ in seqs]
        texts = [""] * len(seqs)
        last: list[RequestOutput | None] = [None] * len(seqs)
        live = [i for i, seq in enumerate(seqs) if not seq.is_finished]
        started = list(live)
        try:
            for k in range(tokens.num_steps):
                if k == tokens.num_steps - 1:
                    self._queue_next_window(batch)
                row = tokens.step(k)
                still = []
                for i in live:
                    if seqs[i].is_finished:  # quarantined with a sibling completion
                        continue
                    out = last[i] = self._read_decoded(seqs[i], row[i])
                    new_tokens[i] += out.new_token_ids
                    texts[i] += out.text_delta
                    if out.finish_reason is None:
                        still.append(i)
                live = still
        except BaseException:
            # the caller fails these requests and frees their pages: nothing queued may still
            # write into them by the time anything allocates
            tokens.step(tokens.num_steps - 1)
            self._drain_window()
            raise
        if not live:  # a queued window of sequences that all finished: nothing to read
            self._drain_window()
        outputs = []
        for i in started:
            end = last[i]
            if end is None:  # quarantined with a sibling; its end goes out next step
                continue
            outputs.append(RequestOutput(seqs[i].request_id, seqs[i].index, new_tokens[i],
                                         texts[i], end.finish_reason, end.usage, end.error))
        return outputs

    def _queue_next_window(self, batch: ScheduledBatch) -> None:
        num_steps = self.scheduler.continue_window(batch)  # (reserves their pages)
        if num_steps:
            tokens = self.runner.continue_decode_steps(batch, num_steps)
            if tokens is not None:
                self.queued_window = (batch, tokens)

    def _drain_window(self) -> None:
        """Wait for the queued window's steps and forget them (their tokens unread: only for
        sequences that all finished, or on the way out)."""
        if self.queued_window is not None:
            tokens = self.queued_window[1]
            self.queued_window = None
            tokens.step(tokens.num_steps - 1)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._drain_window()  # the device may still write into pages
        self.offload.close()

    # ------------------------------------------------------------------ internals
    def _track(self, seq: Sequence) -> None:
        self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.sampling.stop)
        if not seq.sampling.is_greedy:
            self._generators[seq.seq_id] = make_generator(seq.sampling, seq.index,
                                                          self.config.device)

    def _fork(self, parent: Sequence, logits) -> list[RequestOutput]:
        """n > 1: the prompt is computed once; completions 1..n-1 share its pages (the partial
        last page is copied on their first write) and sample their own first token."""
        parent.fork_pending = False
        outputs = []
        for index in range(1, parent.sampling.n):
            child = parent.fork(index, parent.sampling)
            self.block_manager.acquire(child.page_ids)
            # owned by the request before anything can raise: a quarantine frees its pages
            self._requests[parent.request_id].append(child)
            self.scheduler.running.append(child)
            self._track(child)
            (token,) = sample(logits, [child.sampling], [self._generators.get(child.seq_id)])
            outputs.append(self._append(child, token))
        return outputs

    @property
    def decode_steps(self) -> int:
        """Greedy decode steps queued on the device at once (1: one step per step())."""
        return self.scheduler.decode_steps

    @decode_steps.setter
    def decode_steps(self, steps: int) -> None:
        self.scheduler.decode_steps = steps

    def _read_decoded(self, seq: Sequence, token: int) -> RequestOutput:
        """A token a multi-step window computed for seq (fed the one before it)."""
        seq.num_computed_tokens += 1
        self._register_full_pages(seq)
        try:
            return self._append(seq, token)
        except Exception as exc:  # noqa: BLE001 - this request alone fails
            own, *siblings = self._quarantine(seq.request_id, exc, first=seq)
            self._pending += siblings  # the window's reading skips them (finished)
            return own
