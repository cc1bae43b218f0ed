"""Prefill/decode disaggregation against colocated serving, one run: the same long prompts
through `kvmesh serve --workers 1` and `kvmesh serve --prefill-workers 1 --decode-workers 1`,
the latter with the handoff through the store (pull) and pushed into the decode worker's host
tier (`--pd-transfer push`). Every worker gets a host tier (`--host-tier-bytes`), so the stacks
differ only in the handoff.

Each request is a streamed completion of fresh random token ids (no prefix-cache hits), greedy
with ignore_eos. Per request the client records the time to the first token (from the prefill
worker when disaggregated), to the second (the decode worker's first) and to the end. The
router's metrics give the handoff: `pd_handoff_wait_seconds` (the prefill worker's wait for its
store writes after the first token), `pd_transfer_seconds` (first token to the decode worker's
first: writes, lookup, load, the last partial page) and `pd_transfer_bytes_total` (KV bytes the
decode worker loaded from the store), hence the handoff's GB/s and its share of the time to the
second token. The stacks run one after the other, each on fresh data dirs; on cuda both roles
share one GPU, each with a memory share (`kvmesh serve` splits it).

    python benchmarks/pd_bench.py --prompt-len 512 1024 --repeats 3                    # CPU
    python benchmarks/pd_bench.py --device cuda --model /tmp/llama-1b --prompt-len 8192
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from kvmesh.deploy.cli import command

SERVING = re.compile(r"kvmesh serving on (http://\S+)")
PD_METRICS = ("kvmesh:pd_requests_total", "kvmesh:pd_fallbacks_total",
              "kvmesh:pd_transfer_bytes_total", "kvmesh:pd_transfer_seconds_sum",
              "kvmesh:pd_transfer_seconds_count", "kvmesh:pd_handoff_wait_seconds_sum")


@dataclass
class Row:
    mode: str
    prompt_tokens: int
    ttft_ms: float  # p50 over repeats
    second_token_ms: float
    e2e_ms: float
    decode_tok_s: float  # output tokens after the second / time after the second
    handoff_wait_ms: float  # mean, disaggregated only
    transfer_ms: float  # mean first token -> decode worker's first token, disaggregated only
    transfer_gb_s: float
    transfer_share: float  # transfer / time to the second token
    handoff_tokens: float  # mean prompt tokens the decode worker took from the store / host tier
    fallbacks: float


class Stack:
    """`kvmesh serve` in a subprocess until `close()`."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self._log = log_path.open("w")
        self.process = subprocess.Popen(command("serve", "--port", "0", *argv),
                                        stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.process.stdout is not None
        self.url = ""
        for line in self.process.stdout:
            match = SERVING.search(line)
            if match:
                self.url = match.group(1)
                break
        if not self.url:
            raise SystemExit(f"kvmesh serve {' '.join(argv)} did not start; see {log_path}")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        values = dict.fromkeys(PD_METRICS, 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in values:
                values[name] += float(line.rsplit(" ", 1)[1])
        return values

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def one_request(url: str, prompt: list[int], output_len: int) -> dict[str, float]:
    """Times (s) to the first and second token and the end, and the usage's store tokens."""
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times: list[float] = []
    usage: dict = {}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                times.append(time.perf_counter() - start)
            usage = event.get("usage") or usage
    end = time.perf_counter() - start
    tiers = usage.get("prompt_tokens_details", {}).get("cached_tokens_by_tier", {})
    return {"first": times[0], "second": times[1] if len(times) > 1 else end, "end": end,
            "num_tokens": usage.get("completion_tokens", 0),
            "handoff": tiers.get("store", 0) + tiers.get("cpu", 0)}


def measure(stack: Stack, mode: str, prompt_len: int, args: argparse.Namespace,
            rng: random.Random) -> Row:
    one_request(stack.url, [rng.randrange(100, args.vocab) for _ in range(prompt_len)],
                args.output_len)  # warm-up: compiles, first allocations
    before = stack.metrics()
    runs = [one_request(stack.url, [rng.randrange(100, args.vocab) for _ in range(prompt_len)],
                        args.output_len) for _ in range(args.repeats)]
    after = stack.metrics()
    delta = {k: after[k] - before[k] for k in PD_METRICS}
    p50 = lambda key: statistics.median(r[key] for r in runs) * 1000  # noqa: E731
    # from the second token on: the decode worker's own rate (the first came from elsewhere)
    decode = [(r["num_tokens"] - 2) / (r["end"] - r["second"]) for r in runs
              if r["end"] > r["second"] and r["num_tokens"] > 2]
    count = delta["kvmesh:pd_transfer_seconds_count"]
    transfer_s = delta["kvmesh:pd_transfer_seconds_sum"] / count if count else 0.0
    num_pd = delta["kvmesh:pd_requests_total"]
    return Row(
        mode=mode, prompt_tokens=prompt_len, ttft_ms=p50("first"),
        second_token_ms=p50("second"), e2e_ms=p50("end"),
        decode_tok_s=statistics.median(decode) if decode else 0.0,
        handoff_wait_ms=delta["kvmesh:pd_handoff_wait_seconds_sum"] / num_pd * 1000
        if num_pd else 0.0,
        transfer_ms=transfer_s * 1000,
        transfer_gb_s=delta["kvmesh:pd_transfer_bytes_total"] / count / transfer_s / 1e9
        if count and transfer_s else 0.0,
        transfer_share=transfer_s * 1000 / p50("second") if transfer_s else 0.0,
        handoff_tokens=statistics.mean(r["handoff"] for r in runs),
        fallbacks=delta["kvmesh:pd_fallbacks_total"])


def print_table(rows: list[Row]) -> None:
    head = ("mode", "prompt", "TTFT p50 ms", "2nd token p50 ms", "e2e p50 ms", "decode tok/s",
            "handoff wait ms", "transfer ms", "handoff GB/s", "transfer share", "handoff tokens",
            "fallbacks")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r.mode} | {r.prompt_tokens} | {r.ttft_ms:.1f} | {r.second_token_ms:.1f} | "
              f"{r.e2e_ms:.1f} | {r.decode_tok_s:.1f} | {r.handoff_wait_ms:.1f} | "
              f"{r.transfer_ms:.1f} | {r.transfer_gb_s:.3f} | {r.transfer_share:.0%} | "
              f"{r.handoff_tokens:.0f} | {r.fallbacks:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152,
                        help="random prompt ids are drawn below this")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="extra `kvmesh worker` argument for both stacks (repeat)")
    parser.add_argument("--host-tier-bytes", type=int, default=512 << 20)
    parser.add_argument("--modes", default="colocated,pd store,pd push",
                        help="comma list of the stacks to run")
    parser.add_argument("--out", type=Path, default=None, help="folder for rows.csv / rows.json")
    args = parser.parse_args()
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-pd-bench-"))
    common = ["--model", args.model, "--device", args.device,
              "--router-arg=--pd-min-tokens=64",
              f"--worker-arg=--host-tier-bytes={args.host_tier_bytes}",
              *[f"--worker-arg={a}" for a in args.worker_arg]]
    pd = ["--prefill-workers", "1", "--decode-workers", "1"]
    setups = {"colocated": ["--workers", "1"],
              "pd store": [*pd, "--router-arg=--pd-transfer=store"],
              "pd push": [*pd, "--router-arg=--pd-transfer=push"]}
    rows: list[Row] = []
    for mode, extra in ((m, setups[m]) for m in args.modes.split(",")):
        name = mode.replace(" ", "-")
        stack = Stack([*common, *extra, "--data-dir", str(tmp / name)], tmp / f"{name}.log")
        try:
            rows += [measure(stack, mode, n, args, rng) for n in args.prompt_len]
        finally:
            stack.close()
    print(f"# {args.device}, model {args.model}, {args.repeats} repeats, output "
          f"{args.output_len} tokens, logs in {tmp}")
    print_table(sorted(rows, key=lambda r: (r.prompt_tokens, r.mode)))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "rows.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        (args.out / "rows.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
