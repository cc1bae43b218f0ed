"""The store's NIXL data plane against NIXL's own raw figure on this host, in one run (issue 24,
the device part: worker -> store -> worker page bandwidth over loopback, host and GPU memory).

Every system moves NUM_PAGES (128) pages per call, of 0.37 MB (SmolLM2-135M), 2 MiB (Llama-3-8B)
and 8 MiB (a 64-layer, 8 KV-head model; not with --quick); put = worker -> store, get = store ->
worker. Each system is a driver process of its own (benchmarks/peers/dataplane_drivers.py) with
its own UCX environment, inherited by its server process:
- NIXL raw: two agents in two processes, one prepped WRITE / READ of 128 descriptors into
  scattered slots of the target's arena; host (DRAM) or GPU (VRAM) memory on either side; agents
  made as the store makes them, or with nixl's defaults (a spinning progress thread);
- kvmesh NIXL: a real `kvmesh store` process and a StoreClient(data_plane="nixl",
  shared_memory=False): put_encoded_pages / get_pages_leased (checked by the client), and
  put_tensor_pages / get_pages_into a registered tensor on the host or the GPU (the caller
  checks);
- kvmesh same-host shared memory (gRPC control, /dev/shm arenas and segments), for reference.
Transports: UCX_TLS left at UCX's default (all it finds: shared memory, cma, tcp, cuda_copy,
cuda_ipc, ...) and UCX_TLS=tcp on `lo` (with cuda_copy where GPU memory is involved).
Each repeat runs every system in turn, the order rotating by repeat, after a warm-up repeat
that is not counted; reported: median and best GB/s (1e9 B/s of page payload) over --repeats,
the server process's CPU seconds per GB, and kvmesh's share of the matching raw figure. A system
that cannot run here prints why and is left out.

    python benchmarks/dataplane_device_bench.py [--quick] [--repeats 9] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

PEERS_DIR = Path(__file__).resolve().parent / "peers"
DRIVER = PEERS_DIR / "dataplane_drivers.py"
sys.path.insert(0, str(PEERS_DIR))  # under `python -P` the script's folder is not on sys.path

from dataplane_drivers import NUM_PAGES, SIZES  # noqa: E402

TCP = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}
TCP_CUDA = {"UCX_TLS": "tcp,cuda_copy", "UCX_NET_DEVICES": "lo"}
# (row name, driver args, extra environment, the raw row it is measured against)
SYSTEMS: list[tuple[str, list[str], dict[str, str], str | None]] = [
    ("NIXL raw DRAM->DRAM, UCX default", ["--system", "raw"], {}, None),
    (
        "NIXL raw DRAM->DRAM, UCX default, nixl's agent defaults",
        ["--system", "raw", "--agents", "nixl"],
        {},
        None,
    ),
    ("NIXL raw DRAM->DRAM, UCX tcp", ["--system", "raw"], TCP, None),
    ("NIXL raw VRAM->DRAM, UCX default", ["--system", "raw", "--local", "vram"], {}, None),
    (
        "NIXL raw VRAM->VRAM, UCX default",
        ["--system", "raw", "--local", "vram", "--remote", "vram"],
        {},
        None,
    ),
    (
        "NIXL raw VRAM->DRAM, UCX tcp,cuda_copy",
        ["--system", "raw", "--local", "vram"],
        TCP_CUDA,
        None,
    ),
    (
        "kvmesh NIXL, put_encoded_pages / get_pages_leased, UCX default",
        ["--system", "kvmesh", "--path", "nixl"],
        {},
        "NIXL raw DRAM->DRAM, UCX default",
    ),
    (
        "kvmesh NIXL, host tensors registered, UCX default",
        ["--system", "kvmesh", "--path", "tensors"],
        {},
        "NIXL raw DRAM->DRAM, UCX default",
    ),
    (
        "kvmesh NIXL, GPU tensors registered, UCX default",
        ["--system", "kvmesh", "--path", "tensors", "--local", "vram"],
        {},
        "NIXL raw VRAM->DRAM, UCX default",
    ),
    (
        "kvmesh NIXL, put_encoded_pages / get_pages_leased, UCX tcp",
        ["--system", "kvmesh", "--path", "nixl"],
        TCP,
        "NIXL raw DRAM->DRAM, UCX tcp",
    ),
    (
        "kvmesh NIXL, GPU tensors registered, UCX tcp,cuda_copy",
        ["--system", "kvmesh", "--path", "tensors", "--local", "vram"],
        TCP_CUDA,
        "NIXL raw VRAM->DRAM, UCX tcp,cuda_copy",
    ),
    (
        "kvmesh same-host shared memory (gRPC control)",
        ["--system", "kvmesh", "--path", "shm"],
        {},
        None,
    ),
]


class Driver:
    """One system's driver process (peer_protocol); `start` returns, `ready` waits for its
    hello: the server pids, or the reason it cannot run (RuntimeError)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, str(DRIVER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **env},
        )
        self.server_pids: list[int] = []

    def ready(self, timeout_s: float) -> None:
        reply = self._read(timeout_s)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        self.server_pids = reply["server_pids"]

    def _read(self, timeout_s: float = 300) -> dict[str, Any]:
        import select

        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            tail = Path(self._log.name).read_text()[-600:] if ready else "(timed out)"
            raise RuntimeError(f"driver ended (rc {self._proc.poll()}): {tail.strip()}")
        return json.loads(line)

    def call(self, **request: Any) -> dict[str, Any]:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def server_cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def start(
    systems: list, sizes: list[str], out: Path, timeout_s: float
) -> tuple[list[Driver], list[str]]:
    """All drivers started at once (each imports torch and nixl), then waited for."""
    drivers, notes = [], []
    for name, args, env, _ in systems:
        log = out / ("driver_" + "".join(c if c.isalnum() else "_" for c in name) + ".log")
        drivers.append(Driver(name, [*args, "--sizes", *sizes], env, log))
    deadline = time.monotonic() + timeout_s
    running = []
    for driver in drivers:
        try:
            driver.ready(max(1.0, deadline - time.monotonic()))
            running.append(driver)
            print(f"  started: {driver.name}", file=sys.stderr, flush=True)
        except (RuntimeError, ValueError) as exc:
            notes.append(f"{driver.name}: did not run ({exc})")
            print(f"  skipped: {notes[-1]}", file=sys.stderr, flush=True)
            driver.close()
    return running, notes


def measure(
    drivers: list[Driver], sizes: list[str], repeats: int, notes: list[str], max_seconds: float
) -> tuple[dict, int]:
    """({(system, op, size): {"seconds": [...], "server_cpu_s": summed}}, repeats done);
    repeat -1 warms up. A driver whose call fails is dropped from then on (noted); no repeat
    starts after `max_seconds`."""
    results: dict[tuple[str, str, str], dict] = {}
    live = list(drivers)
    started, done = time.monotonic(), 0
    for rep in range(-1, repeats):
        if time.monotonic() - started > max_seconds:
            notes.append(f"stopped after {done} of {repeats} repeats (--max-seconds)")
            break
        shift = max(rep, 0) % max(1, len(live))
        for driver in live[shift:] + live[:shift]:
            try:
                for size in sizes:
                    for op in ("put", "get"):
                        cpu0 = server_cpu_seconds(driver.server_pids)
                        seconds = driver.call(op=op, size=size)["seconds"]
                        cpu = server_cpu_seconds(driver.server_pids) - cpu0
                        if rep >= 0:
                            row = results.setdefault(
                                (driver.name, op, size), {"seconds": [], "server_cpu_s": 0.0}
                            )
                            row["seconds"].append(seconds)
                            row["server_cpu_s"] += cpu
                driver.call(op="cleanup")
            except (RuntimeError, ValueError, OSError) as exc:
                notes.append(f"{driver.name}: failed in repeat {rep + 1} ({exc})")
                print(f"  dropped: {notes[-1]}", file=sys.stderr, flush=True)
                live.remove(driver)
                driver.close()
        done = rep + 1
        print(
            f"repeat {done}/{repeats} done, load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )
    return results, done


def rows_of(results: dict, sizes: list[str], repeats: int) -> list[dict]:
    rows = []
    for name, _, _, against in SYSTEMS:
        for size in sizes:
            for op in ("put", "get"):
                row = results.get((name, op, size))
                if row is None or len(row["seconds"]) < repeats or not repeats:
                    continue
                nbytes = NUM_PAGES * SIZES[size]
                gbps = [nbytes / s / 1e9 for s in row["seconds"]]
                rows.append(
                    {
                        "system": name,
                        "op": op,
                        "size": size,
                        "against": against,
                        "gbps_median": statistics.median(gbps),
                        "gbps_best": max(gbps),
                        "server_cpu_s_per_gb": row["server_cpu_s"] / (nbytes * len(gbps) / 1e9),
                        "repeats": len(gbps),
                    }
                )
    by_key = {(r["system"], r["op"], r["size"]): r for r in rows}
    for row in rows:
        raw = by_key.get((row["against"], row["op"], row["size"])) if row["against"] else None
        row["share_of_raw"] = row["gbps_median"] / raw["gbps_median"] if raw else None
    return rows


def print_table(rows: list[dict], sizes: list[str], header: str) -> None:
    cell = {(r["system"], r["op"], r["size"]): r for r in rows}
    columns = [(op, size) for size in sizes for op in ("put", "get")]
    names = list(dict.fromkeys(r["system"] for r in rows))
    titles = " | ".join(f"{op} {size}" for op, size in columns)
    for title, key, fmt in (
        ("median GB/s (share of its raw NIXL row)", "gbps_median", "{:.2f}"),
        ("server CPU s per GB", "server_cpu_s_per_gb", "{:.2f}"),
    ):
        print(f"\n{header}: {title}\n\n| system | {titles} |\n|---|{'---:|' * len(columns)}")
        for name in names:
            values = []
            for op, size in columns:
                row = cell.get((name, op, size))
                text = "—" if row is None else fmt.format(row[key])
                if row is not None and key == "gbps_median" and row["share_of_raw"] is not None:
                    text += f" ({row['share_of_raw']:.0%})"
                values.append(text)
            print(f"| {name} | {' | '.join(values)} |")


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")},
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # the bench still runs its host rows
        info["torch"] = f"unavailable: {exc}"
    try:
        from importlib.metadata import version

        info["nixl"] = next(
            (f"{name} {version(name)}" for name in ("nixl-cu13", "nixl") if _has_dist(name)), None
        )
    except Exception as exc:
        info["nixl"] = f"unknown: {exc}"
    return info


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 repeats, 0.37MB and 2MiB pages"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run the systems whose name contains any of these words",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=180, help="seconds for all drivers to start"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=1e9,
        help="start no repeat after this many seconds of measuring",
    )
    parser.add_argument(
        "--out",
        default="/tmp/dataplane_device_bench",
        help="folder for the JSON and the drivers' logs",
    )
    args = parser.parse_args()
    if args.quick:  # (and without the spinning progress thread: it takes a core of few)
        args.repeats, args.sizes = 2, ["0.37MB", "2MiB"]
        if args.only is None:
            args.only = [name for name, *_ in SYSTEMS if "nixl's agent defaults" not in name]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = [s for s in SYSTEMS if args.only is None or any(w in s[0] for w in args.only)]
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    drivers, notes = start(systems, args.sizes, out, args.start_timeout)
    try:
        results, repeats = measure(drivers, args.sizes, args.repeats, notes, args.max_seconds)
    finally:
        for driver in drivers:
            driver.close()
    load_after = os.getloadavg()
    rows = rows_of(results, args.sizes, repeats)
    header = (
        f"{repeats} repeats, {NUM_PAGES} pages per call, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after"
    )
    print_table(rows, args.sizes, header)
    for note in notes:
        print(f"\n- {note}", end="")
    print()
    meta = {
        "date_utc": started.isoformat(timespec="seconds"),
        "load_before": load_before,
        "load_after": load_after,
        "repeats": repeats,
        "num_pages": NUM_PAGES,
        "sizes": {size: SIZES[size] for size in args.sizes},
        "notes": notes,
        "argv": sys.argv,
        **environment(),
    }
    path = out / "dataplane_device_bench.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
