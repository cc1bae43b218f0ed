"""Trace-driven router simulation, no model: compare routing policies on simulated workers.

Workers have an LRU page cache and a prefill/decode cost model (serial prefill, batched decode).
The trace mixes shared-prefix groups (Zipf popularity) and multi-turn conversations. "ours" runs
the real router.index.PrefixIndex (fed by KV events that arrive `--event-delay` late) and
router.policy.choose; "oracle" is the same policy reading every cache exactly and instantly.
A second part times one decision (hashing + index walk + policy) at 1,000 workers and ~1M pages.

    python benchmarks/router_sim.py                  # full table (a few minutes on 2 cores)
    python benchmarks/router_sim.py --workers 8 --requests-per-worker 100
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import random
import time
import tracemalloc
from collections import OrderedDict

import numpy as np

from kvmesh.cachestore.keys import Namespace
from kvmesh.router.routing.index import TIER_DEVICE, Cleared, PrefixIndex, Removed, Stored
from kvmesh.router.routing.policy import BalanceThreshold, CostModel, WorkerLoad, choose

PAGE = 16
NS = Namespace(model="sim", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16",
               page_size=PAGE)
# GPU-scale costs (ms): ~10k prompt tokens/s prefill per worker, 20 ms per decode step.
COST = CostModel(prefill_ms_per_token=0.1, host_ms_per_token=0.01, store_ms_per_token=0.02,
                 queued_ms_per_token=0.1, running_ms_per_request=1.0)
DECODE_MS_PER_TOKEN = 20.0


class SimClock:
    now = 0.0


class SimWorker:
    """A worker's cache and queues; also the live load object the policy reads (LoadLike), as
    the router's pool handles are."""

    def __init__(self, capacity_pages: int, clock: SimClock) -> None:
        self.clock = clock
        self.capacity = capacity_pages
        self.cache: OrderedDict[bytes, None] = OrderedDict()
        self.prefill_free_at = 0.0
        self.num_inflight = 0
        self.num_assigned = 0
        self.seq = 1

    @property
    def num_queued_tokens(self) -> int:
        wait_s = max(self.prefill_free_at - self.clock.now, 0.0)
        return int(wait_s * 1e3 / COST.prefill_ms_per_token)

    @property
    def num_cached_pages(self) -> int:
        return len(self.cache)

    def hit_pages(self, keys: list[bytes]) -> int:
        n = 0
        for key in keys:
            if key not in self.cache:
                break
            n += 1
        return n

    def insert(self, keys: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Touch/insert `keys` (LRU); returns (new keys, evicted keys)."""
        new = []
        for key in keys:
            if key in self.cache:
                self.cache.move_to_end(key)
            else:
                self.cache[key] = None
                new.append(key)
        evicted = []
        while len(self.cache) > self.capacity:
            evicted.append(self.cache.popitem(last=False)[0])
        return new, evicted


class ApproxTree:
    """SGLang-style approximate cache: the router remembers what it routed where (no events),
    per-worker LRU with a size cap; page-granular instead of a character radix tree."""

    def __init__(self, num_workers: int, capacity_pages: int) -> None:
        self.index = PrefixIndex(predicted_ttl_s=1e18)
        self.lru = [OrderedDict() for _ in range(num_workers)]
        self.capacity = capacity_pages
        self.seq = [1] * num_workers
        for w in range(num_workers):
            self.index.add_worker(str(w))
            self.index.apply(str(w), 1, Cleared(0))

    def insert(self, w: int, keys: list[bytes]) -> None:
        lru, new = self.lru[w], []
        for key in keys:
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
                new.append(key)
        evicted = [lru.popitem(last=False)[0] for _ in range(max(len(lru) - self.capacity, 0))]
        for event in (Stored(new, TIER_DEVICE), Removed(evicted, TIER_DEVICE)):
            self.seq[w] += 1
            self.index.apply(str(w), self.seq[w], event)


def make_trace(num_workers: int, num_requests: int, rng: random.Random) -> list[dict]:
    """Requests: shared-prefix groups (2 per worker, Zipf) and multi-turn conversations
    (2 per worker, 3-6 turns). Multi-turn follow-ups are released when the previous turn ends."""
    num_groups, num_convs = 2 * num_workers, 2 * num_workers
    group_prefix = [[rng.randrange(50_000) for _ in range(2048)] for _ in range(num_groups)]
    zipf = np.array([1 / (i + 1) ** 0.8 for i in range(num_groups)])
    group_of = np.random.default_rng(rng.randrange(1 << 30)).choice(
        num_groups, size=num_requests, p=zipf / zipf.sum())
    trace = []
    for i in range(num_requests):
        if i % 2 == 0:
            suffix = [rng.randrange(50_000) for _ in range(rng.randint(32, 256))]
            trace.append({"kind": "group", "tokens": group_prefix[group_of[i]] + suffix,
                          "output": rng.randint(32, 160)})
        else:
            trace.append({"kind": "conv", "conv": (i // 2) % num_convs, "output":
                          rng.randint(64, 160), "user": rng.randint(64, 256)})
    return trace


def simulate(policy: str, num_workers: int, trace: list[dict], rate: float, seed: int,
             capacity_pages: int, event_delay_s: float, balance: BalanceThreshold) -> dict:
    rng = random.Random(seed)
    clock = SimClock()
    workers = [SimWorker(capacity_pages, clock) for _ in range(num_workers)]
    loads = {str(i): wk for i, wk in enumerate(workers)}
    now = 0.0
    index = PrefixIndex(predicted_ttl_s=1.0, clock=lambda: clock.now)
    for w in range(num_workers):
        index.add_worker(str(w))
        index.apply(str(w), 1, Cleared(0))
    approx = ApproxTree(num_workers, capacity_pages) if policy == "sglang" else None
    exact = PrefixIndex()  # the oracle's view: every cache, updated the moment it changes
    for w in range(num_workers):
        exact.add_worker(str(w))
        exact.apply(str(w), 1, Cleared(0))
    heap: list = []
    tie = itertools.count()
    history: dict[int, list[int]] = {}
    conv_ready: dict[int, float] = {}
    t = 0.0
    for req in trace:
        t += rng.expovariate(rate)
        heapq.heappush(heap, (t, next(tie), "arrive", req))
    rr = itertools.count()
    hits = prompt_total = 0
    ttfts, decide_us = [], []
    while heap:
        now, _, kind, data = heapq.heappop(heap)
        clock.now = now
        if kind == "done":
            workers[data].num_inflight -= 1
            continue
        if kind == "events":
            w, new, evicted = data
            for event in (Stored(new, TIER_DEVICE), Removed(evicted, TIER_DEVICE)):
                workers[w].seq += 1
                index.apply(str(w), workers[w].seq, event)
            continue
        req = data
        if req["kind"] == "conv":  # next turn of a conversation waits for the previous answer
            c = req["conv"]
            if conv_ready.get(c, 0.0) > now:
                heapq.heappush(heap, (conv_ready[c], next(tie), "arrive", req))
                continue
            hist = history.setdefault(c, [rng.randrange(50_000) for _ in range(300)])
            hist += [rng.randrange(50_000) for _ in range(req["user"])]
            tokens = list(hist)
        else:
            tokens = req["tokens"]
        keys = NS.page_keys(tokens)
        t0 = time.thread_time()
        if policy == "round_robin":
            w = next(rr) % num_workers
        elif policy == "least_loaded":
            w = min(range(num_workers), key=lambda i: workers[i].num_inflight)
        else:
            if policy == "sglang":
                w = sglang_choice(approx, keys, workers)
            else:
                matches = (exact if policy == "oracle" else index).match(keys)
                w = int(choose(len(tokens), PAGE, matches, loads, cost=COST,
                               balance=balance).worker_id)
                if policy == "ours":
                    index.predict(str(w), keys)
        decide_us.append((time.thread_time() - t0) * 1e6)
        if approx is not None:
            approx.insert(w, keys)
        wk = workers[w]
        cached = min(wk.hit_pages(keys) * PAGE, len(tokens) - 1)
        hits += cached
        prompt_total += len(tokens)
        start = max(now, wk.prefill_free_at)
        prefill_end = start + (len(tokens) - cached) * COST.prefill_ms_per_token / 1e3
        wk.prefill_free_at = prefill_end
        ttfts.append(prefill_end - now)
        done = prefill_end + req["output"] * DECODE_MS_PER_TOKEN / 1e3
        wk.num_inflight += 1
        wk.num_assigned += 1
        heapq.heappush(heap, (done, next(tie), "done", w))
        if req["kind"] == "conv":
            hist += [rng.randrange(50_000) for _ in range(req["output"])]
            conv_ready[req["conv"]] = done + rng.expovariate(1.0)
            keys = NS.page_keys(hist)
        new, evicted = wk.insert(keys)
        if policy == "oracle":
            for event in (Stored(new, TIER_DEVICE), Removed(evicted, TIER_DEVICE)):
                wk.seq += 1
                exact.apply(str(w), wk.seq, event)
        if policy == "ours":  # KV events reach the router's index late
            heapq.heappush(heap, (prefill_end + event_delay_s, next(tie), "events",
                                  (w, new, evicted)))
    assigned = np.array([wk.num_assigned for wk in workers], dtype=float)
    return {"hit": hits / prompt_total, "ttft_mean": float(np.mean(ttfts)),
            "ttft_p99": float(np.percentile(ttfts, 99)),
            "imbalance": float(np.percentile(assigned, 99) / assigned.mean()),
            "decide_p50": float(np.percentile(decide_us, 50)),
            "decide_p99": float(np.percentile(decide_us, 99))}


def sglang_choice(approx: ApproxTree, keys: list[bytes], workers: list[SimWorker]) -> int:
    """SGLang router rule: if loads are imbalanced (max-min > 32 and max > 1.0001 min) go to the
    least loaded; else the best match if its match rate > 0.5, else the smallest tree."""
    loads = [wk.num_inflight for wk in workers]
    lo, hi = min(loads), max(loads)
    if hi - lo > 32 and hi > 1.0001 * lo:
        return loads.index(lo)
    matches = approx.index.match(keys)
    if matches:
        best, match = max(matches.items(), key=lambda kv: kv[1].num_pages)
        if match.num_pages / max(len(keys), 1) > 0.5:
            return int(best)
    sizes = [len(lru) for lru in approx.lru]
    return sizes.index(min(sizes))


def scale_test(num_workers: int, num_pages: int, seed: int) -> dict:
    """One decision at `num_workers` workers with `num_pages` distinct pages indexed (prefix
    chains of 128 pages, each whole on one worker and partly on two more), as the router makes
    it: key hashing of a prompt of up to 2,048 tokens + index walk + policy over every worker's
    load (plain attributes, like the pool's handles) + recording the predicted entries."""
    rng = random.Random(seed)
    chain_pages = 128
    num_chains = -(-num_pages // chain_pages)
    np_rng = np.random.default_rng(seed)
    prompts = np_rng.integers(0, 50_000, size=(num_chains, chain_pages * PAGE), dtype=np.int32)
    gc.collect()
    tracemalloc.start()
    index = PrefixIndex()
    for w in range(num_workers):
        index.add_worker(str(w))
        index.apply(str(w), 1, Cleared(0))
    seq = [1] * num_workers
    for c in range(num_chains):
        keys = NS.page_keys(prompts[c])
        for j, w in enumerate(rng.sample(range(num_workers), 3)):
            seq[w] += 1
            n = chain_pages if j == 0 else rng.randint(1, chain_pages)
            index.apply(str(w), seq[w], Stored(keys[:n], TIER_DEVICE))
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    gc.collect()
    gc.freeze()  # as the router does once warm: long-lived index dicts leave GC scans
    loads = {str(w): WorkerLoad(rng.randint(0, 8), 0) for w in range(num_workers)}
    samples, cpu = [], []
    for _ in range(2000):
        tokens = prompts[rng.randrange(num_chains)][: rng.randint(64, 2048)]
        t0, c0 = time.perf_counter(), time.thread_time()
        keys = NS.page_keys(tokens)
        decision = choose(len(tokens), PAGE, index.match(keys), loads, cost=COST)
        index.predict(decision.worker_id, keys)
        cpu.append((time.thread_time() - c0) * 1e6)
        samples.append((time.perf_counter() - t0) * 1e6)
        assert decision.worker_id in loads
    gc.unfreeze()
    return {"pages": index.num_pages(), "entries": sum(index.num_pages(str(w)) for w in
            range(num_workers)), "mem_mb": memory / 2**20,
            "p50": float(np.percentile(samples, 50)), "p99": float(np.percentile(samples, 99)),
            "cpu_p50": float(np.percentile(cpu, 50)), "cpu_p99": float(np.percentile(cpu, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64, 1000])
    parser.add_argument("--requests-per-worker", type=int, default=40)
    parser.add_argument("--load", type=float, default=0.7, help="offered prefill utilization")
    parser.add_argument("--capacity-pages", type=int, default=1024, help="KV pages per worker")
    parser.add_argument("--event-delay", type=float, default=0.05, help="KV event lag, seconds")
    parser.add_argument("--scale-pages", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balance-abs", type=int, default=BalanceThreshold().balance_abs)
    parser.add_argument("--balance-rel", type=float, default=BalanceThreshold().balance_rel)
    parser.add_argument("--policies", nargs="+",
                        default=["round_robin", "least_loaded", "sglang", "ours", "oracle"])
    args = parser.parse_args()
    policies = args.policies
    balance = BalanceThreshold(args.balance_abs, args.balance_rel)
    print(f"{'workers':>7} {'policy':>12} {'hit rate':>8} {'vs oracle':>9} {'TTFT mean':>9} "
          f"{'TTFT p99':>9} {'p99/mean':>8} {'decide p50':>10} {'p99 (us)':>9}")
    print("(decision times are thread CPU time: the policy alone, prompt keys precomputed)")
    for n in args.workers:
        trace = make_trace(n, args.requests_per_worker * n, random.Random(args.seed))
        # ~1,200 uncached prompt tokens per request at 0.1 ms/token -> rate for the wanted load
        rate = args.load * n / (1200 * COST.prefill_ms_per_token / 1e3)
        results = {p: simulate(p, n, trace, rate, args.seed, args.capacity_pages,
                               args.event_delay, balance) for p in policies}
        oracle_hit = results.get("oracle", {"hit": float("nan")})["hit"]
        for p, r in results.items():
            print(f"{n:>7} {p:>12} {r['hit']:>8.1%} {r['hit'] / oracle_hit:>9.1%} "
                  f"{r['ttft_mean'] * 1e3:>7.0f}ms {r['ttft_p99'] * 1e3:>7.0f}ms "
                  f"{r['imbalance']:>8.2f} {r['decide_p50']:>10.0f} {r['decide_p99']:>9.0f}",
                  flush=True)
    if not args.scale_pages:
        return
    s = scale_test(1000, args.scale_pages, args.seed)
    print(f"\nscale: 1000 workers, {s['pages']:,} distinct pages ({s['entries']:,} worker-page "
          f"entries), index memory {s['mem_mb']:.0f} MiB; decision (hash+walk+policy+predict) "
          f"wall p50 {s['p50']:.0f} us, p99 {s['p99']:.0f} us; thread CPU time p50 "
          f"{s['cpu_p50']:.0f} us, p99 {s['cpu_p99']:.0f} us")


if __name__ == "__main__":
    main()
