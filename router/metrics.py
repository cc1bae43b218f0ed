"""The router's Prometheus metrics through `prometheus_client` (vLLM's names, `kvmesh:` prefix).

One router process: each `RouterMetrics` owns a `CollectorRegistry`, so several routers built in
one process (tests) never share or collide. Several router processes: set
`PROMETHEUS_MULTIPROC_DIR` to an empty folder before they start (prometheus_client picks its
value store when it is first imported); every process writes its values there and `render()`
merges all of them. Each gauge says how processes combine (`multiprocess_mode`); a launcher that
replaces a process calls `prometheus_client.multiprocess.mark_process_dead(pid)` so its `live*`
gauges drop out. `kvmesh router --processes N` (router/processes.py) does both for its serving
processes.

The wrappers keep the calls the router makes: `inc(amount, **labels)`, `set(value, **labels)`,
`observe(value)`, and `get(**labels)` / `samples()` to read a value in this process."""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
LabelKey = tuple[tuple[str, str], ...]
MultiprocessMode = Literal["livesum", "mostrecent"]

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)

# `*_created` series (one gauge family per counter and histogram) are not part of the exported
# set and would double every scrape; multiprocess mode never has them either.
disable_created_metrics()


def multiprocess_dir() -> str | None:
    """The folder shared by the router's processes, or None in single-process mode."""
    return os.environ.get(MULTIPROC_DIR_ENV) or None


class _Labelled:
    """A prometheus_client metric with its label names fixed at construction."""

    def __init__(self, metric: _Counter | _Gauge | _Histogram, labelnames: Sequence[str]) -> None:
        self._metric = metric
        self._labelnames = tuple(labelnames)

    def _child(self, labels: dict[str, str]):
        return self._metric.labels(**labels) if self._labelnames else self._metric

    def samples(self) -> dict[LabelKey, float]:
        """Value of each label set this process has recorded (counters: the `_total` sample)."""
        name = self._metric._name
        wanted = (name + "_total", name)
        return {tuple(sorted(s.labels.items())): s.value
                for family in self._metric.collect() for s in family.samples
                if s.name in wanted}

    def get(self, **labels: str) -> float:
        """This process's value of the series with exactly `labels`; 0 if never recorded."""
        return self.samples().get(tuple(sorted((k, str(v)) for k, v in labels.items())), 0.0)


class Counter(_Labelled):
    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None) -> None:
        super().__init__(_Counter(name, help_text, labelnames, registry=registry), labelnames)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).inc(amount)


class Gauge(_Labelled):
    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None, mode: MultiprocessMode) -> None:
        super().__init__(_Gauge(name, help_text, labelnames, registry=registry,
                                multiprocess_mode=mode), labelnames)

    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)


class Histogram(_Labelled):
    def __init__(self, name: str, help_text: str, buckets: Sequence[float],
                 registry: CollectorRegistry | None) -> None:
        self._histogram = _Histogram(name, help_text, registry=registry, buckets=buckets)
        self._bounds = tuple(self._histogram._upper_bounds)  # ends with +Inf
        super().__init__(self._histogram, ())

    def observe(self, value: float) -> None:
        self._histogram.observe(value)

    def observe_many(self, values: Sequence[float]) -> None:
        """Same as observe() for each value, in one write per bucket: a stream's inter-token
        gaps are kept in a list and written in bulk, not at a lock and a bucket scan each.
        prometheus_client keeps a value per bucket (not cumulative) and the sum."""
        if not values:
            return
        bounds = self._bounds
        counts = [0] * len(bounds)
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1  # the first bucket with value <= le
        for bucket, count in zip(self._histogram._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self._histogram._sum.inc(math.fsum(values))


class RouterMetrics:
    """Every metric the router exports; names follow vLLM's (`vllm:` -> `kvmesh:`).

    Worker-reported gauges (from each worker's Stats poll) merge across router processes as the
    most recent value; the router's own in-flight count as the sum over live processes."""

    def __init__(self) -> None:
        self._multiprocess_dir = multiprocess_dir()
        registry = None if self._multiprocess_dir else CollectorRegistry()
        self.registry = registry
        p = "kvmesh:"

        def counter(name: str, help_text: str, *labels: str) -> Counter:
            return Counter(p + name, help_text, labels, registry)

        def gauge(name: str, help_text: str, *labels: str,
                  mode: MultiprocessMode = "mostrecent") -> Gauge:
            return Gauge(p + name, help_text, labels, registry, mode)

        def histogram(name: str, help_text: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(p + name, help_text, buckets, registry)

        self.requests_running = gauge("num_requests_running", "Requests decoding, per worker",
                                      "worker")
        self.requests_waiting = gauge("num_requests_waiting", "Requests queued, per worker",
                                      "worker")
        self.router_inflight = gauge("router_requests_inflight", "Requests the router holds",
                                     mode="livesum")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV pages in use (0-1), per worker",
                              "worker")
        self.prefix_queries = counter("prefix_cache_queries_total",
                                      "Prompt tokens looked up in prefix caches")
        self.prefix_hits = counter("prefix_cache_hits_total",
                                   "Prompt tokens served from a cache, by tier", "tier")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency", TTFT_BUCKETS)
        self.decisions = counter("routing_decisions_total", "Routing decisions", "reason",
                                 "worker")
        self.retries = counter("request_retries_total", "Requests moved to another worker",
                               "code")
        self.migrations = counter("request_migrations_total",
                                  "Streams that went on on another worker after a worker failed "
                                  "mid-stream")
        self.requests = counter("request_success_total", "Finished requests", "finished_reason")
        self.errors = counter("http_errors_total", "Error responses, by HTTP status", "status")
        self.client_disconnects = counter("client_disconnects_total",
                                          "Requests whose client left before the response ended")
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens")
        self.generation_tokens = counter("generation_tokens_total", "Generated tokens")
        self.worker_healthy = gauge("worker_healthy", "1 if the worker takes requests", "worker")
        self.index_pages = gauge("index_pages", "Page keys in the router's prefix index")
        self.index_worker_pages = gauge("index_worker_pages",
                                        "Page keys the prefix index holds for each worker",
                                        "worker")
        self.index_lag = gauge("index_lag_events",
                               "KV events a worker emitted that the index has not applied",
                               "worker")
        self.store_lookup_errors = counter("store_lookup_errors_total",
                                           "Store lookups that failed or came late (a miss)",
                                           "code")
        self.index_resyncs = counter("index_resyncs_total", "Event stream resyncs", "worker")
        self.pd_requests = counter("pd_requests_total",
                                   "Requests whose prefill was sent to a prefill worker")
        self.pd_fallbacks = counter("pd_fallbacks_total",
                                    "Disaggregated requests that ran colocated, by reason",
                                    "reason")
        self.pd_transfer_bytes = counter("pd_transfer_bytes_total",
                                         "KV bytes decode workers loaded from the store for "
                                         "disaggregated requests")
        self.pd_transfer_seconds = histogram(
            "pd_transfer_seconds", "From a disaggregated request's first token (prefill "
            "worker) to its second (decode worker): store writes, load, last page",
            TTFT_BUCKETS)
        self.pd_handoff_wait = histogram(
            "pd_handoff_wait_seconds", "Time prefill workers waited for a prompt's pages "
            "to reach the store after its first token", TTFT_BUCKETS)

    def worker_down(self, worker: str) -> None:
        """A worker taken out: unhealthy, and nothing running or waiting there as far as the
        router knows (its last Stats answer must not read on as live load)."""
        self.worker_healthy.set(0, worker=worker)
        self.requests_running.set(0, worker=worker)
        self.requests_waiting.set(0, worker=worker)

    def render(self) -> bytes:
        """Prometheus text exposition: this router's registry, or every router process's values
        merged from the multiprocess folder."""
        if self.registry is not None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self._multiprocess_dir)
        return generate_latest(merged)
