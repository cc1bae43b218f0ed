"""The store's data plane against its peers on this host, in one run (issue 24).

Every peer moves the same page bytes over loopback: NUM_PAGES (128) pages per call, of
SmolLM2-135M size (0.37 MB) and Llama-3-8B size (2 MiB). Peers:
- kvmesh (a `kvmesh store` started here): tensor API, raw pages without shared memory,
  same-host shared memory (segment, and mapped + client-side checks), and the NIXL data plane
  where StoreClient has one (benchmarks/peers/kvmesh_peers.py);
- Mooncake Store over TCP (mooncake_master + a segment holder + a client; peers venv);
- Mooncake Store over same-host shared memory (mooncake_master + `mooncake_client`, the real
  client owning the segment, + a dummy client whose memfd buffer the real client maps and
  memcpys into and out of; peers venv);
- Redis: redis-py + hiredis, pipelines of 128, a `redis-server` started on a free port;
- NIXL raw two-agent loopback transfers (peers venv), UCX tcp on `lo` with 256 KiB segments,
  and UCX cma,tcp (same host only): the transfer engine's ceiling;
- memcpy in this process: the ceiling of any same-host path.
Each repeat runs every peer in turn, the order rotating repeat by repeat, after one warm-up
repeat that is not counted; each peer's turn is put then get of each size, then cleanup
(what the puts stored is deleted, so every put stores new pages). Reported: median GB/s
(1e9 B/s of page payload) over --repeats, and the server's CPU seconds per GB (psutil, all
threads of the server processes, summed over the repeats). Then lookup latency of a
2,048-token prompt (128 pages): kvmesh StoreClient.lookup (the lookup socket where the
server offers it, else gRPC Lookup) and Stats (the gRPC floor), Mooncake
batch_is_exist of 128 keys, Redis EXISTS x128 pipelined, in interleaved rounds.

Peers in the peers' venv (`bash benchmarks/peers/setup.sh`) are skipped with a note when it is
missing, as is Redis without redis-server; kvmesh alone always runs.

    python -P benchmarks/store_bench.py [--repeats 7] [--quick] [--out DIR] [--peers-venv DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psutil

PEERS_DIR = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS_DIR))  # under `python -P` the script's folder is not on sys.path

from kvmesh_peers import KvmeshPeer, kvmesh_peers  # noqa: E402
from local_peers import DriverPeer, MemcpyPeer, RedisPeer, peers_python, print_note  # noqa: E402
from peer_protocol import NUM_PAGES, SIZES, Peer  # noqa: E402

UCX_LOOPBACK = {"UCX_NET_DEVICES": "lo"}  # else UCX stripes over lo and eth0
NIXL_TRANSPORTS = {
    "NIXL raw, UCX tcp (256k segments)": {
        **UCX_LOOPBACK,
        "UCX_TLS": "tcp",
        "UCX_TCP_TX_SEG_SIZE": "256k",
        "UCX_TCP_RX_SEG_SIZE": "256k",
        "UCX_TCP_SNDBUF": "8m",
        "UCX_TCP_RCVBUF": "8m",
    },
    "NIXL raw, UCX cma,tcp (same host)": {**UCX_LOOPBACK, "UCX_TLS": "cma,tcp"},
}
COLUMNS = [(op, size) for size in SIZES for op in ("put", "get")]


def start_store(cpu_bytes: int) -> tuple[subprocess.Popen, str]:
    cmd = [
        shutil.which("kvmesh") or "kvmesh",
        "store",
        "--port",
        "0",
        "--cpu-bytes",
        str(cpu_bytes),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.match(r"kvmesh store listening on (\S+)", line)
    if not match:
        proc.kill()
        sys.exit(f"store did not start: {line!r}")
    return proc, match.group(1)


def start_peers(
    args: argparse.Namespace, target: str, store_pid: int
) -> tuple[list[Peer], list[str]]:
    peers, notes = kvmesh_peers(target, store_pid)
    python = peers_python(args.peers_venv)
    mooncake = PEERS_DIR / "mooncake_peer.py"
    drivers = [
        ("Mooncake Store over TCP", mooncake, {}, ("--transport", "tcp")),
        ("Mooncake Store over shared memory", mooncake, {}, ("--transport", "shm")),
    ]
    drivers += [
        (name, PEERS_DIR / "nixl_peer.py", env, ()) for name, env in NIXL_TRANSPORTS.items()
    ]
    for name, script, env, driver_args in drivers:
        if python is None:
            notes.append(
                f"{name}: no peers venv at {args.peers_venv} (bash benchmarks/peers/setup.sh)"
            )
            continue
        log = os.path.join(args.out, re.sub(r"\W+", "_", name).strip("_") + ".log")
        try:
            peers.append(DriverPeer(name, python, str(script), log, env, driver_args))
        except RuntimeError as exc:
            notes.append(f"{name}: did not start ({exc})")
    for make in (RedisPeer, MemcpyPeer):
        try:
            peers.append(make())
        except (ImportError, RuntimeError) as exc:
            notes.append(f"{make.name}: {exc}")
    return peers, notes


def server_cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()  # every thread of the process
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(peers: list[Peer], repeats: int) -> dict[tuple[str, str, str], dict]:
    """{(peer, op, size): {"seconds": [per repeat], "server_cpu_s": summed}}; repeat -1 warms
    up (first touch of buffers, connections) and is dropped."""
    results: dict[tuple[str, str, str], dict] = {}
    for rep in range(-1, repeats):
        shift = max(rep, 0) % len(peers)
        for peer in peers[shift:] + peers[:shift]:
            for op, size in COLUMNS:
                cpu0 = server_cpu_seconds(peer.server_pids)
                seconds = getattr(peer, op)(size)
                cpu = server_cpu_seconds(peer.server_pids) - cpu0
                if rep >= 0:
                    row = results.setdefault(
                        (peer.name, op, size), {"seconds": [], "server_cpu_s": 0.0}
                    )
                    row["seconds"].append(seconds)
                    row["server_cpu_s"] += cpu
            peer.cleanup()
        print(
            f"repeat {rep + 1}/{repeats} done, load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )
    return results


def measure_lookups(peers: list[Peer], num_calls: int) -> dict[str, list[float]]:
    """Latency lists per call kind, in rounds of 100 calls taking turns (rotating)."""
    calls = {}
    for peer in peers:
        if isinstance(peer, KvmeshPeer) and peer.name == "kvmesh raw pages, no shm":
            calls["kvmesh StoreClient.lookup (lookup socket, else gRPC)"] = peer.lookup
            calls["kvmesh Stats RPC (the gRPC floor)"] = peer.stats_floor
        elif peer.name.startswith(("Mooncake", "Redis")):
            label = "batch_is_exist" if peer.name.startswith("Mooncake") else "EXISTS x128"
            calls[f"{peer.name.split(' (')[0]} {label}"] = peer.lookup
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(max(1, num_calls // 100)):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            latencies[name] += calls[name](min(100, num_calls))
    return latencies


def rows_of(peers: list[Peer], results: dict) -> list[dict]:
    rows = []
    for peer in peers:
        for op, size in COLUMNS:
            row = results.get((peer.name, op, size))
            if row is None:
                continue
            nbytes = NUM_PAGES * SIZES[size]
            gbps = [nbytes / s / 1e9 for s in row["seconds"]]
            rows.append(
                {
                    "path": peer.name,
                    "op": op,
                    "size": size,
                    "is_own_path": op == "get" or peer.put_is_own_path,
                    "gbps_median": statistics.median(gbps),
                    "gbps_best": max(gbps),
                    "server_cpu_s_per_gb": row["server_cpu_s"] / (nbytes * len(gbps) / 1e9)
                    if peer.server_pids
                    else None,
                    "repeats": len(gbps),
                }
            )
    return rows


def print_tables(rows: list[dict], lookups: dict[str, list[float]], header: str) -> None:
    cell = {(r["path"], r["op"], r["size"]): r for r in rows if r["is_own_path"]}
    paths = list(dict.fromkeys(r["path"] for r in rows))
    titles = " | ".join(f"{op} {size}" for op, size in COLUMNS)
    for title, key, fmt in (
        ("median GB/s", "gbps_median", "{:.2f}"),
        ("server CPU s per GB", "server_cpu_s_per_gb", "{:.2f}"),
    ):
        print(f"\n{header}: {title}\n\n| path | {titles} |\n|---|{'---:|' * len(COLUMNS)}")
        for path in paths:
            values = []
            for op, size in COLUMNS:
                row = cell.get((path, op, size))
                values.append("—" if row is None or row[key] is None else fmt.format(row[key]))
            print(f"| {path} | {' | '.join(values)} |")
    if lookups:
        print(
            "\nlookup of a 2,048-token prompt (128 pages), ms\n\n| call | p50 | p99 | calls |\n"
            "|---|---:|---:|---:|"
        )
        for name, values in lookups.items():
            q = statistics.quantiles(values, n=100)
            print(f"| {name} | {q[49] * 1e3:.3f} | {q[98] * 1e3:.3f} | {len(values)} |")


def write_outputs(out: str, meta: dict, rows: list[dict], lookups: dict[str, list[float]]) -> None:
    with open(os.path.join(out, "store_bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        name: {
            "p50_ms": statistics.quantiles(v, n=100)[49] * 1e3,
            "p99_ms": statistics.quantiles(v, n=100)[98] * 1e3,
            "calls": len(v),
        }
        for name, v in lookups.items()
    }
    with open(os.path.join(out, "store_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "lookup": summary}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lookup-calls", type=int, default=1000, help="per call kind")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run, about a minute: 2 repeats, 200 lookups each",
    )
    parser.add_argument(
        "--cpu-bytes",
        type=int,
        default=1_600_000_000,
        help="the kvmesh store's CPU tier (issue 24 capped it at 1.6 GB)",
    )
    parser.add_argument(
        "--peers-venv", default=os.environ.get("KVMESH_PEERS_VENV", "/tmp/kvmesh-peers")
    )
    parser.add_argument("--out", default="/tmp/store_bench", help="folder for CSV, JSON, logs")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.lookup_calls = 2, 200
    os.makedirs(args.out, exist_ok=True)
    store, target = start_store(args.cpu_bytes)
    peers: list[Peer] = []
    try:
        peers, notes = start_peers(args, target, store.pid)
        for note in notes:
            print_note(note)
        load_before = os.getloadavg()
        started = datetime.now(UTC)
        results = measure(peers, args.repeats)
        lookups = measure_lookups(peers, args.lookup_calls)
        load_after = os.getloadavg()
    finally:
        for peer in peers:
            peer.close()
        store.terminate()
        store.wait(timeout=30)
    rows = rows_of(peers, results)
    meta = {
        "date_utc": started.isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_after,
        "repeats": args.repeats,
        "num_pages": NUM_PAGES,
        "cpu_bytes": args.cpu_bytes,
        "notes": notes,
        "argv": sys.argv,
    }
    header = (
        f"{args.repeats} repeats, {os.cpu_count()} CPUs, load average "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after"
    )
    print_tables(rows, lookups, header)
    for note in notes:
        print(f"\n- {note}", end="")
    print()
    write_outputs(args.out, meta, rows, lookups)
    print(f"\nwrote {args.out}/store_bench.csv and store_bench.json", file=sys.stderr)


if __name__ == "__main__":
    main()
