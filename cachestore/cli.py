"""`kvmesh store`: run a store server until SIGINT / SIGTERM.

Prints `kvmesh store listening on HOST:PORT` once it accepts calls (port 0: the port picked),
then one line per tier. On the signal it stops taking calls, copies the cpu tier's pages down to
the tiers below for at most `flush_s` seconds (one line on stderr says how many), and prints
`kvmesh store stopped`; a second signal meanwhile ends it at once (the default action)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from kvmesh.cachestore.config import StoreConfig, parse_bytes
from kvmesh.cachestore.errors import InvalidConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "store", help="run a KV page store server",
        description="Run a tiered KV page store (cpu, then disk / redis / remote) over gRPC. "
                    "Every flag can also come from KVMESH_STORE_<FLAG> (e.g. KVMESH_STORE_PORT).")
    add = parser.add_argument
    add("--host", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, help="port to listen on; 0 picks a free one (default 0)")
    add("--cpu-bytes", type=_size, help="CPU tier capacity, e.g. 4G (default 4G)")
    add("--disk-dir", help="directory of the disk tier (default: no disk tier)")
    add("--disk-bytes", type=_size, help="disk tier capacity, e.g. 64G")
    add("--redis-url", help="redis:// URL of the Redis tier (default: no Redis tier)")
    add("--redis-ttl", type=int, help="seconds a page lives in Redis (default: no TTL)")
    add("--redis-mac-key-file", help="file holding the secret (>= 16 bytes) that seals Redis "
                                     "pages with a MAC, so pages others write there are misses "
                                     "(or KVMESH_STORE_REDIS_MAC_KEY); without one, pages in "
                                     "Redis are forgeable by anyone who can write it")
    add("--disk-mac-key-file", help="file holding the secret that seals disk-tier pages with a "
                                    "MAC, for a disk others can write (or "
                                    "KVMESH_STORE_DISK_MAC_KEY)")
    add("--remote", help="HOST:PORT of another store server, the last tier")
    add("--remote-token", help="bearer token for --remote")
    add("--remote-tls-ca", help="PEM CA certificate of --remote: connect to it over TLS")
    add("--token", help="the deployment's internal bearer token, required on every call; "
                        "prefer KVMESH_STORE_TOKEN (argv is visible to every local user)")
    add("--token-file", help="JSON file of client tokens, each bound to one tenant, read or "
                             "read-write; their salts derive from KVMESH_STORE_TENANT_SECRET")
    add("--tls-cert", help="PEM certificate chain; with --tls-key enables TLS")
    add("--tls-key", help="PEM private key")
    add("--max-workers", type=int, help="server threads (default 32)")
    add("--max-bulk-streams", type=int,
        help="Put / PutPages / GetClosest / GetPages streams at once; more are refused with "
             "RESOURCE_EXHAUSTED, so control calls keep threads (default 3/4 of --max-workers)")
    add("--stream-idle-s", type=float,
        help="cancel a bulk stream that waits this long on its client (default 10)")
    add("--shared-memory", action=argparse.BooleanOptionalAction, default=None,
        help="let clients on this host receive pages through /dev/shm segments, and map the "
             "cpu tier's pages from /dev/shm arenas (default on)")
    add("--data-plane", choices=("auto", "nixl", "grpc"),
        help="how bulk page bytes move: NIXL/UCX one-sided READ/WRITE into the cpu tier's "
             "registered arenas (nixl: the `dataplane` extra; UCX_* env vars tune it), gRPC "
             "frames for clients without it; auto: NIXL when nixl loads (default auto)")
    add("--flush-s", type=float, help="on SIGTERM / SIGINT, seconds at most spent copying the "
                                      "cpu tier's pages down to disk / redis / remote, so a "
                                      "restart finds them; pages not copied by then are lost "
                                      "(default 20; 0: no flush). A second signal exits at once")
    add("--lease-s", type=float, help="seconds a mapped read's pages stay unchanged unless "
                                      "released first, and that reserved slots wait for their "
                                      "commit (NIXL or same-host shared-memory puts; default 30)")
    add("--metrics-port", type=int,
        help="serve Prometheus text of the tiers' counters at /metrics on this port; 0 picks a "
             "free one (default: off). Asks for 'Authorization: Bearer' "
             "KVMESH_STORE_METRICS_TOKEN, else the store's token, when either is set")
    add("--metrics-host", help="address for --metrics-port (default 127.0.0.1; any other "
                               "needs a token)")
    parser.set_defaults(func=run)


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 512M, 4G)") from None


def run(args: argparse.Namespace) -> int:
    from kvmesh.cachestore.malloc import keep_freed_memory
    from kvmesh.cachestore.rpc.metrics_http import StoreMetricsConfig, StoreMetricsServer
    from kvmesh.cachestore.rpc.server import serve_store  # grpc + tiers: only when actually serving

    flags = {name: getattr(args, name, None) for name in StoreConfig.__dataclass_fields__}
    try:
        config = StoreConfig.from_sources(flags)
        metrics_config = StoreMetricsConfig.from_sources(vars(args), config)
    except InvalidConfig as exc:
        print(f"kvmesh store: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()  # this process moves GBs through short-lived buffers
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = serve_store(config)
    except (InvalidConfig, OSError) as exc:
        print(f"kvmesh store: {exc}", file=sys.stderr)
        return 1
    metrics = None
    if metrics_config.port is not None:
        try:
            metrics = StoreMetricsServer(metrics_config, server.store)
        except OSError as exc:
            server.stop(grace=0)
            print(f"kvmesh store: metrics port: {exc}", file=sys.stderr)
            return 1
    print(f"kvmesh store listening on {config.host}:{server.port}", flush=True)
    if metrics is not None:
        print(f"kvmesh store metrics on {metrics.url}", flush=True)
    print(f"kvmesh store: data plane {server.data_plane_note}", file=sys.stderr, flush=True)
    for tier in server.store.stats():
        print(f"  tier {tier.name}: capacity {tier.capacity_bytes} bytes, "
              f"{tier.num_pages} pages", flush=True)
    stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal: no flush, exit now
        signal.signal(sig, signal.SIG_DFL)
    if metrics is not None:
        metrics.stop()
    flushed = server.stop(grace=2.0, flush_s=config.flush_s)
    if flushed is not None and flushed.num_flushed + flushed.num_left:
        print(f"kvmesh store: copied {flushed.num_flushed} cpu-tier pages down in "
              f"{flushed.seconds:.1f} s; {flushed.num_left} not copied (lost), "
              f"{flushed.num_already_below} were there already", file=sys.stderr, flush=True)
    print("kvmesh store stopped", flush=True)
    return 0
