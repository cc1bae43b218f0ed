"""Prometheus text exposition for the router (vLLM-style names with a `kvmesh:` prefix).

A small registry instead of a client library: counters, gauges and histograms with labels, all
updated from the router's single asyncio loop."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

LabelKey = tuple[tuple[str, str], ...]

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


def _labels(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _fmt_labels(key: LabelKey, extra: tuple[str, str] | None = None) -> str:
    items = list(key) + ([extra] if extra else [])
    if not items:
        return ""
    body = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in items)
    return "{" + body + "}"


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help_text = help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(_labels(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_fmt_labels(k)} {v}" for k, v in self.values.items()]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[_labels(labels)] = float(value)

    def clear(self) -> None:
        self.values.clear()


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last = +Inf only
        self.total = 0.0
        self.num = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.num += 1

    def render(self) -> list[str]:
        lines = self.header()
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.num}')
        lines.append(f"{self.name}_sum {self.total}")
        lines.append(f"{self.name}_count {self.num}")
        return lines


class RouterMetrics:
    """Every metric the router exports; names follow vLLM's (`vllm:` -> `kvmesh:`)."""

    def __init__(self) -> None:
        p = "kvmesh:"
        self.requests_running = Gauge(p + "num_requests_running", "Requests decoding, per worker")
        self.requests_waiting = Gauge(p + "num_requests_waiting", "Requests queued, per worker")
        self.router_inflight = Gauge(p + "router_requests_inflight", "Requests the router holds")
        self.kv_usage = Gauge(p + "kv_cache_usage_perc", "KV pages in use (0-1), per worker")
        self.prefix_queries = Counter(p + "prefix_cache_queries_total",
                                      "Prompt tokens looked up in prefix caches")
        self.prefix_hits = Counter(p + "prefix_cache_hits_total",
                                   "Prompt tokens served from a cache, by tier")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token",
                              TTFT_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between output tokens",
                             ITL_BUCKETS)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency", TTFT_BUCKETS)
        self.decisions = Counter(p + "routing_decisions_total", "Routing decisions")
        self.retries = Counter(p + "request_retries_total", "Requests moved to another worker")
        self.migrations = Counter(p + "request_migrations_total",
                                  "Streams that went on on another worker after a worker failed "
                                  "mid-stream")
        self.requests = Counter(p + "request_success_total", "Finished requests")
        self.errors = Counter(p + "http_errors_total", "Error responses, by HTTP status")
        self.client_disconnects = Counter(p + "client_disconnects_total",
                                          "Requests whose client left before the response ended")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Generated tokens")
        self.worker_healthy = Gauge(p + "worker_healthy", "1 if the worker takes requests")
        self.index_pages = Gauge(p + "index_pages", "Page keys in the router's prefix index")
        self.index_worker_pages = Gauge(p + "index_worker_pages",
                                        "Page keys the prefix index holds for each worker")
        self.index_lag = Gauge(p + "index_lag_events",
                               "KV events a worker emitted that the index has not applied")
        self.store_lookup_errors = Counter(p + "store_lookup_errors_total",
                                           "Store lookups that failed or came late (a miss)")
        self.index_resyncs = Counter(p + "index_resyncs_total", "Event stream resyncs")
        self.pd_requests = Counter(p + "pd_requests_total",
                                   "Requests whose prefill was sent to a prefill worker")
        self.pd_fallbacks = Counter(p + "pd_fallbacks_total",
                                    "Disaggregated requests that ran colocated, by reason")
        self.pd_transfer_bytes = Counter(p + "pd_transfer_bytes_total",
                                         "KV bytes decode workers loaded from the store for "
                                         "disaggregated requests")
        self.pd_transfer_seconds = Histogram(
            p + "pd_transfer_seconds", "From a disaggregated request's first token (prefill "
            "worker) to its second (decode worker): store writes, load, last page",
            TTFT_BUCKETS)
        self.pd_handoff_wait = Histogram(
            p + "pd_handoff_wait_seconds", "Time prefill workers waited for a prompt's pages "
            "to reach the store after its first token", TTFT_BUCKETS)

    def render(self) -> str:
        lines: list[str] = []
        for metric in vars(self).values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
