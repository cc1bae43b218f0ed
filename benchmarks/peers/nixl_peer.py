"""NIXL raw two-agent transfer, as a store_bench.py peer (run in the peers' venv): the transfer
engine's ceiling on this host, with no store logic at all.

Two processes: a target agent owning an arena of NUM_SLOTS slots per page size (the "server":
pages land in NUM_PAGES scattered slots, like a tier's slots after churn) and this driver, the
initiator, with one contiguous buffer. put = one prepped WRITE of NUM_PAGES descriptors, get =
one READ. UCX backend; the caller picks the transport with the environment (UCX_TLS,
UCX_NET_DEVICES, UCX_TCP_*), which the target inherits. Metadata is exchanged over the target's
stdin/stdout (a store would send it over gRPC).

The target's progress thread sleeps in poll() between events (pthrDelay 1 ms): the Python
wrapper hard-codes pthrDelay=0, a busy loop that takes a whole core of this 2-core machine
even when idle. UCX over TCP needs the target to progress (it emulates RMA with messages);
CMA (process_vm_readv/writev) does not.

    UCX_TLS=tcp UCX_NET_DEVICES=lo python benchmarks/peers/nixl_peer.py   (speaks peer_protocol)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from peer_protocol import NUM_PAGES, SIZES, page_buffer, protocol_stdout, serve

NUM_SLOTS = 160


def slot_layout() -> tuple[dict[str, tuple[int, np.ndarray]], int]:
    """{size: (offset of its slots in the arena, the NUM_PAGES slot indices used)}, arena bytes."""
    rng = np.random.default_rng(7)
    layout, offset = {}, 0
    for size, nbytes in SIZES.items():
        slots = np.sort(rng.choice(NUM_SLOTS, NUM_PAGES, replace=False)).astype(np.int32)
        layout[size] = (offset, slots)
        offset += nbytes * NUM_SLOTS
    return layout, offset


def make_agent(name: str, progress_thread: bool):  # -> nixl._api.nixl_agent
    import nixl._api as api

    real_config = api.nixlBind.nixlAgentConfig

    class SleepingProgressConfig(real_config):  # the wrapper sets pthrDelay=0 after construction
        def __setattr__(self, key: str, value: object) -> None:
            super().__setattr__(key, 1000 if key == "pthrDelay" else value)

    api.nixlBind.nixlAgentConfig = SleepingProgressConfig
    try:
        config = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
        return api.nixl_agent(name, config)
    finally:
        api.nixlBind.nixlAgentConfig = real_config


def run_target() -> None:
    """The target: register the arena, trade metadata on stdin/stdout, wait for EOF."""
    out = protocol_stdout()
    _, arena_nbytes = slot_layout()
    arena = np.ones(arena_nbytes, dtype=np.uint8)  # touched: no first-touch faults in transfers
    agent = make_agent("target", progress_thread=True)
    agent.register_memory([(arena.ctypes.data, arena.nbytes, 0, "")], "DRAM")
    out.write(
        json.dumps({"metadata": agent.get_agent_metadata().hex(), "address": arena.ctypes.data})
        + "\n"
    )
    out.flush()
    agent.add_remote_agent(bytes.fromhex(sys.stdin.readline().strip()))
    sys.stdin.read()


class NixlPeer:
    def __init__(self) -> None:
        self.name = "NIXL raw"
        self._target = subprocess.Popen(
            [sys.executable, __file__, "--role", "target"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.server_pids = [self._target.pid]
        hello = json.loads(self._target.stdout.readline())
        self._buffer = page_buffer()
        agent = self._agent = make_agent("initiator", progress_thread=False)
        agent.register_memory([(self._buffer.ctypes.data, self._buffer.nbytes, 0, "")], "DRAM")
        self._target.stdin.write(agent.get_agent_metadata().hex() + "\n")
        self._target.stdin.flush()
        remote = agent.add_remote_agent(bytes.fromhex(hello["metadata"]))
        layout, _ = slot_layout()
        self._local, self._remote, self._slots = {}, {}, {}
        base = self._buffer.ctypes.data
        for size, nbytes in SIZES.items():
            offset, slots = layout[size]
            self._local[size] = agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT",
                [(base + i * nbytes, nbytes, 0) for i in range(NUM_PAGES)],
                "DRAM",
            )
            self._remote[size] = agent.prep_xfer_dlist(
                remote,
                [(hello["address"] + offset + s * nbytes, nbytes, 0) for s in range(NUM_SLOTS)],
                "DRAM",
            )
            self._slots[size] = slots
        self._indices = np.arange(NUM_PAGES, dtype=np.int32)
        self._transfer("READ", "0.37MB")  # the first transfer wires up the connection

    def _transfer(self, op: str, size: str) -> float:
        t0 = time.perf_counter()
        handle = self._agent.make_prepped_xfer(
            op, self._local[size], self._indices, self._remote[size], self._slots[size]
        )
        state = self._agent.transfer(handle)
        while state == "PROC":
            state = self._agent.check_xfer_state(handle)
        seconds = time.perf_counter() - t0
        handle.release()
        if state != "DONE":
            raise RuntimeError(f"NIXL {op}: {state}")
        return seconds

    def put(self, size: str) -> float:
        return self._transfer("WRITE", size)

    def get(self, size: str) -> float:
        return self._transfer("READ", size)

    def lookup(self, num_calls: int) -> list[float]:
        return []  # a transfer engine has no index

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        self._target.stdin.close()
        self._target.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("driver", "target"), default="driver")
    if parser.parse_args().role == "target":
        run_target()
    else:
        serve(NixlPeer)
    # NIXL 1.5.1 can segfault tearing its agents down at interpreter exit; all is done by now
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
