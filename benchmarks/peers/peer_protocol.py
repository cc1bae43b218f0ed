"""What store_bench.py and its peer drivers share: page sizes, the driver contract, and the
line-JSON protocol between them. Standard library and numpy only: it is imported both in
kvmesh's venv (store_bench.py) and in the peers' venv (the drivers).

A peer is a client of one system with a long-lived server process; it moves the same bytes as
every other peer: NUM_PAGES pages of one of SIZES, from / into one contiguous client buffer.
A driver process serves one peer on stdin/stdout, one JSON object per line:
  -> {"op": "put" | "get", "size": "2MiB"}       <- {"seconds": float}
  -> {"op": "lookup", "num_calls": n}            <- {"seconds": [float, ...]}  (one per call)
  -> {"op": "cleanup"}                           <- {}   (drop what puts stored)
  EOF on stdin                                   -> the driver stops its servers and exits
After start the driver prints {"server_pids": [...]} (the processes whose CPU counts as the
server's) or {"error": "..."} and exits.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from typing import Any, Protocol

import numpy as np

NUM_PAGES = 128
SIZES = {  # page name -> page payload bytes
    "0.37MB": 30 * 2 * 16 * 3 * 64 * 2,  # SmolLM2-135M: 30 layers x K,V x 16 tokens x 3 x 64, bf16
    "2MiB": 32 * 2 * 16 * 8 * 128 * 2,  # Llama-3-8B: 32 layers x K,V x 16 tokens x 8 x 128, bf16
}
LOOKUP_KEYS = 128  # a 2,048-token prompt in 16-token pages


class Peer(Protocol):
    """One system under test, as store_bench.py drives it. put(size) stores NUM_PAGES pages of
    SIZES[size] (fresh: cleanup() ran since the last put); get(size) reads those back. Both
    return seconds. `server_pids`: processes whose CPU is the server's."""

    name: str
    server_pids: list[int]

    def put(self, size: str) -> float: ...
    def get(self, size: str) -> float: ...
    def lookup(self, num_calls: int) -> list[float]: ...
    def cleanup(self) -> None: ...
    def close(self) -> None: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_buffer(seed: int = 0) -> np.ndarray:
    """The client's buffer: NUM_PAGES of the largest page, random bytes."""
    nbytes = NUM_PAGES * max(SIZES.values())
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def protocol_stdout() -> Any:
    """A private copy of stdout for the protocol; fd 1 then points at stderr, so whatever the
    native libraries (glog, UCX) print cannot corrupt it."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def serve(make_peer: Any) -> None:
    """Run a driver: make_peer() -> Peer, then answer requests until stdin closes."""
    out = protocol_stdout()
    try:
        peer = make_peer()
    except Exception as exc:  # any failure to start is reported, store_bench skips the peer
        traceback.print_exc()
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    out.write(json.dumps({"server_pids": peer.server_pids}) + "\n")
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request["op"]
            if op in ("put", "get"):
                reply: dict[str, Any] = {"seconds": getattr(peer, op)(request["size"])}
            elif op == "lookup":
                reply = {"seconds": peer.lookup(request["num_calls"])}
            elif op == "cleanup":
                peer.cleanup()
                reply = {}
            else:
                reply = {"error": f"unknown op {op!r}"}
            out.write(json.dumps(reply) + "\n")
    finally:
        peer.close()
