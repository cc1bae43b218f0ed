"""Chaos benchmark (hardening issue 22): a mixed load against a real local stack while its parts
are killed, restarted and stalled.

Stack (benchmarks/chaos_stack.py): a private redis-server, a store (CPU tier, disk tier, Redis
tier), two CPU workers (SmolLM2, one torch thread each) and a router, each a subprocess on a port
fixed at start. Load (benchmarks/chaos_load.py): `--concurrency` clients sending chat and
completion requests, streamed or not, from several tenants; 80% greedy, checked against the
answer the healthy stack gave at the start; some clients leave mid-request. Faults, at fixed
fractions of `--duration`: worker SIGKILL + restart, store SIGKILL + restart, Redis SIGKILL +
restart, a 10 s store stall (SIGSTOP, SIGCONT), the other worker SIGKILL + restart.

Prints one markdown table: requests by outcome, failures by cause and by the fault they
overlapped, p50/p99 latency, and each process's RSS in the first and the last minute.

    python benchmarks/chaos.py --duration 300 --csv-dir /tmp/chaos
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from chaos_load import REQUEST_TIMEOUT_S, Outcome, compute_reference, random_spec, send
from chaos_stack import Stack, build_stack, redis_command

# fault name -> fraction of the duration at which it starts; the last ~40% stays quiet so that
# the last minute shows RSS after every restart has warmed up.
FAULTS = {"worker0-kill": 0.2, "store-kill": 0.3, "redis-kill": 0.4, "store-stall": 0.5,
          "worker1-kill": 0.6}
STALL_S = 10.0
REDIS_DOWN_S = 5.0
RSS_EVERY_S = 2.0
# a request overlapping [fault start, fault end + grace] is counted against that fault
FAULT_GRACE_S = 5.0


@dataclass
class FaultEvent:
    name: str
    started: float
    ended: float = 0.0  # when the part was back (ready, or resumed)


def _run_fault(stack: Stack, name: str) -> None:
    """Blocking: do the fault and wait until the part is back."""
    part_name = name.split("-")[0]
    part = stack.parts[part_name]
    if name == "store-stall":
        part.pause()
        time.sleep(STALL_S)
        part.resume()
        return
    part.kill()
    if part_name == "redis":
        time.sleep(REDIS_DOWN_S)
    part.start()
    part.wait_ready()
    if part_name.startswith("worker"):
        stack.wait_healthy()


async def _faults(stack: Stack, names: list[str], t0: float, duration: float,
                  events: list[FaultEvent]) -> None:
    for name in sorted(names, key=FAULTS.__getitem__):
        await asyncio.sleep(max(0.0, t0 + FAULTS[name] * duration - time.monotonic()))
        event = FaultEvent(name, time.monotonic())
        events.append(event)
        print(f"[{event.started - t0:6.1f}s] fault {name}", flush=True)
        await asyncio.to_thread(_run_fault, stack, name)
        event.ended = time.monotonic()
        print(f"[{event.ended - t0:6.1f}s] {name}: back after {event.ended - event.started:.1f} s",
              flush=True)


async def _sample_rss(stack: Stack, t0: float, stop: asyncio.Event,
                      samples: list[tuple[float, str, int]]) -> None:
    while not stop.is_set():
        now = time.monotonic() - t0
        for name, part in stack.parts.items():
            rss = part.rss_bytes()
            if rss is not None:
                samples.append((now, name, rss))
        try:
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)
        except TimeoutError:
            pass


async def _client_loop(client: httpx.AsyncClient, args: argparse.Namespace, seed: int,
                       reference: dict, api_keys: list[str], deadline: float,
                       outcomes: list[Outcome]) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        spec = random_spec(rng, args.prompts, api_keys, args.disconnect_rate)
        outcome = await send(client, spec, args.max_tokens, reference, rng)
        outcomes.append(outcome)
        if outcome.status == "failed":
            await asyncio.sleep(0.5)  # a failing stack is not hammered in a tight loop


def _fault_of(outcome: Outcome, events: list[FaultEvent]) -> str:
    end = outcome.started + outcome.latency_s
    for event in events:
        if outcome.started <= (event.ended or end) + FAULT_GRACE_S and end >= event.started:
            return event.name
    return "no fault"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def _report(args: argparse.Namespace, stack: Stack, outcomes: list[Outcome],
            events: list[FaultEvent], rss: list[tuple[float, str, int]], t0: float,
            duration: float) -> str:
    counts = Counter(o.status for o in outcomes)
    lines = ["| measure | value |", "|---|---|",
             f"| duration (load) | {duration:.0f} s, {args.concurrency} clients, "
             f"{len(stack.api_keys)} tenants, max_tokens {args.max_tokens} |",
             f"| requests sent | {len(outcomes)} ({Counter(o.spec.kind for o in outcomes)}) |"]
    greedy_checked = sum(o.status in ("ok", "wrong") and o.spec.is_greedy for o in outcomes)
    lines += [f"| ok | {counts['ok']} ({greedy_checked} greedy, checked) |",
              f"| disconnected on purpose | {counts['disconnected']} |",
              f"| **failed** | **{counts['failed']}** |",
              f"| **wrong outputs** | **{counts['wrong']}** of {greedy_checked} checked |"]
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        if o.status == "failed":
            groups.setdefault((o.cause, _fault_of(o, events)), []).append(o)
    for (cause, fault), group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        kinds = ", ".join(sorted({o.spec.kind for o in group}))
        num_events = sorted(o.num_events for o in group)
        lines.append(f"| failed: {cause} (during {fault}; {kinds}; content events received "
                     f"{num_events[0]}..{num_events[-1]}) | {len(group)} |")
    for fault, n in Counter(_fault_of(o, events) for o in outcomes if o.status == "wrong").items():
        lines.append(f"| wrong (during {fault}) | {n} |")
    done = [o for o in outcomes if o.status in ("ok", "wrong")]
    for label, group in (("all", done), ("streamed", [o for o in done if o.spec.is_stream]),
                         ("not streamed", [o for o in done if not o.spec.is_stream])):
        lat = [o.latency_s for o in group]
        lines.append(f"| latency {label} p50 / p99 | {_pct(lat, 50):.2f} s / "
                     f"{_pct(lat, 99):.2f} s (n={len(lat)}) |")
    for event in events:
        lines.append(f"| fault {event.name} at {event.started - t0:.0f} s | back after "
                     f"{event.ended - event.started:.1f} s |")
    for name, part in stack.parts.items():
        first = [r for t, n, r in rss if n == name and t < 60]
        last = [r for t, n, r in rss if n == name and t >= duration - 60]
        if not first or not last:
            continue
        mib = 1 << 20
        lines.append(f"| RSS {name} (starts: {part.num_starts}) first min / last min (max) | "
                     f"{max(first) / mib:.0f} / {max(last) / mib:.0f} MiB "
                     f"(last min {min(last) / mib:.0f}..{max(last) / mib:.0f}) |")
    return "\n".join(lines)


def router_metrics(url: str) -> str:
    """Totals of a few router counters, by label: retries, disconnects, errors, cache hits."""
    wanted = ("kvmesh:request_retries_total", "kvmesh:client_disconnects_total",
              "kvmesh:http_errors_total", "kvmesh:prefix_cache_hits_total")
    totals: Counter[str] = Counter()
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(wanted):
            series, value = line.rsplit(" ", 1)
            totals[series.removeprefix("kvmesh:")] += float(value)
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(totals.items()) if v)


def error_log_lines(stack: Stack) -> str:
    """Lines with ERROR or Traceback in each process's log."""
    counts = {}
    for name, part in stack.parts.items():
        text = (part.log_dir / f"{name}.log").read_text(errors="replace")
        counts[name] = sum("ERROR" in line or "Traceback" in line for line in text.splitlines())
    return str(counts)


def _write_csv(folder: Path, outcomes: list[Outcome], events: list[FaultEvent],
               rss: list[tuple[float, str, int]], t0: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "requests.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["t_s", "latency_s", "kind", "greedy", "disconnect", "tenant_key",
                      "prompt_id", "status", "cause", "fault", "events", "text"])
        for o in outcomes:
            out.writerow([f"{o.started - t0:.2f}", f"{o.latency_s:.3f}", o.spec.kind,
                          o.spec.is_greedy, o.spec.is_disconnect, o.spec.api_key,
                          o.spec.prompt_id, o.status, o.cause, _fault_of(o, events),
                          o.num_events, o.text])
    with open(folder / "rss.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["t_s", "process", "rss_bytes"])
        out.writerows((f"{t:.1f}", n, r) for t, n, r in rss)
    with open(folder / "faults.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["fault", "start_s", "back_s"])
        out.writerows((e.name, f"{e.started - t0:.1f}", f"{e.ended - t0:.1f}") for e in events)


async def _main(args: argparse.Namespace, stack: Stack) -> str:
    api_keys = list(stack.api_keys)
    limits = httpx.Limits(max_connections=4 * args.concurrency)
    async with httpx.AsyncClient(base_url=stack.url, timeout=REQUEST_TIMEOUT_S,
                                 limits=limits) as client:
        reference = await compute_reference(client, args.prompts, api_keys[0], args.max_tokens)
        print(f"reference answers: {len(reference)} (each reproduced once)", flush=True)
        for (prompt_id, is_chat), text in sorted(reference.items()):
            print(f"  {prompt_id} {'chat' if is_chat else 'completion'}: {text!r}", flush=True)
        t0 = time.monotonic()
        outcomes: list[Outcome] = []
        events: list[FaultEvent] = []
        rss: list[tuple[float, str, int]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(stack, t0, stop, rss))
        faults = asyncio.create_task(_faults(stack, args.faults, t0, args.duration, events))
        await asyncio.gather(*(_client_loop(client, args, args.seed + i, reference, api_keys,
                                            t0 + args.duration, outcomes)
                               for i in range(args.concurrency)))
        await faults  # a fault still recovering finishes before the report
        duration = time.monotonic() - t0
        stop.set()
        await sampler
    if args.csv_dir:
        _write_csv(Path(args.csv_dir), outcomes, events, rss, t0)
    return _report(args, stack, outcomes, events, rss, t0, duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="distinct questions")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--disconnect-rate", type=float, default=0.1)
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma list from {', '.join(FAULTS)} ('' = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", help="process logs, disk tier, redis dir (default: temp)")
    parser.add_argument("--csv-dir", help="write requests.csv, rss.csv, faults.csv here")
    args = parser.parse_args()
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {list(FAULTS)}")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="kvmesh-chaos-"))
    stack = build_stack(log_dir, num_tenants=args.tenants, store_cpu_bytes=32 << 20,
                        disk_bytes=32 << 20,
                        kv_cache_bytes=64 << 20, max_model_len=512)
    print(f"logs in {log_dir}", flush=True)
    try:
        started = time.monotonic()
        stack.start()
        print(f"stack up in {time.monotonic() - started:.0f} s at {stack.url}", flush=True)
        table = asyncio.run(_main(args, stack))
        alive = {n: p.pid is not None for n, p in stack.parts.items()}
        print(table)
        print(f"| every process alive at the end | {all(alive.values())} {alive} |")
        print(f"| router counters | {router_metrics(stack.url)} |")
        num_keys = redis_command(stack.parts["redis"].port, "DBSIZE").decode().lstrip(":")
        print(f"| pages in Redis at the end (since its restart) | {num_keys} |")
        print(f"| log lines with ERROR / Traceback | {error_log_lines(stack)} |")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
