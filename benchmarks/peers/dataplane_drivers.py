"""Drivers for dataplane_device_bench.py (peer_protocol, one system per process, so each runs
under its own UCX environment, which its server process inherits). Needs kvmesh and nixl-cu13
(or nixl) importable; no peers' venv, no Redis.

- `--system raw`: NIXL alone, two agents in two processes (this initiator and a target
  process owning an arena of NUM_SLOTS slots per page size; metadata over the target's stdin /
  stdout). put = one prepped WRITE of NUM_PAGES descriptors into scattered slots, get = one
  READ, polled back to back. `--local` / `--remote`: dram or vram (a CUDA tensor) on each side.
  `--agents kvmesh`: made as the store makes its agents (cachestore/dataplane/agent.py: UCX
  TCP segment sizes, a target progress thread that sleeps in poll()); `nixl`: nixl's own
  defaults (a progress thread that spins).
- `--system kvmesh`: a real `kvmesh store` process started here and a StoreClient in this
  process, as a worker has it. `--path`:
  - `nixl`: data_plane="nixl", shared memory off: put_encoded_pages (NIXL WRITE from the
    caller's pages, registered per call) / get_pages_leased (READ into the client's registered
    buffer; every page checked here: header, key, xxh3);
  - `tensors`: data_plane="nixl", shared memory off: pages in one registered uint8 tensor
    (`--local dram`: host, `vram`: GPU), put_tensor_pages / get_pages_into that tensor (no
    client-side check: a worker checksums on the device);
  - `shm`: data_plane="grpc", same-host shared memory: put_encoded_pages (one copy into the
    server's shared arenas) / get_pages_leased (the server copies into this client's segment).
  The server checks every page before it is visible, on every path.
A system that cannot run here (no CUDA, VRAM not registrable, ...) answers {"error": ...} at
start, and the bench reports it instead of a row.

    python benchmarks/peers/dataplane_drivers.py --system raw --local vram --remote dram
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import numpy as np
from peer_protocol import NUM_PAGES, SIZES, protocol_stdout, serve

SIZES = {**SIZES, "8MiB": 64 * 2 * 16 * 8 * 128 * 2}  # a 64-layer, 8 x 128 KV-head model
SHAPES = {  # page size -> (model, num_layers, num_kv_heads, head_dim), bf16, 16-token pages
    "0.37MB": ("SmolLM2-135M", 30, 3, 64),
    "2MiB": ("Llama-3-8B", 32, 8, 128),
    "8MiB": ("Qwen2.5-32B", 64, 8, 128),
}
NUM_SLOTS = 144  # target slots per page size; NUM_PAGES of them are used, scattered


def nixl_module() -> Any:
    from kvmesh.cachestore.dataplane import agent

    api = agent.nixl_api()
    if api is None:
        raise RuntimeError(f"nixl unavailable: {agent.why_unavailable()}")
    return api


def make_raw_agent(name: str, agents: str, progress_thread: bool) -> Any:
    from kvmesh.cachestore.dataplane import agent

    if agents == "kvmesh":
        return agent.make_agent(name, progress_thread)
    api = nixl_module()
    if not os.path.exists("/dev/infiniband"):
        os.environ.setdefault("UCX_MODULES", "^ib")  # (agent.py: a crash at exit otherwise)
    config = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
    return api.nixl_agent(name, config)


def allocate(nbytes: int, memory: str) -> tuple[Any, int, str, int]:
    """(keep-alive object, address, NIXL memory type, device id) of `nbytes` of touched
    memory: host (numpy) or the current CUDA device's (torch)."""
    if memory == "dram":
        array = np.ones(nbytes, dtype=np.uint8)  # touched: no first-touch faults in transfers
        return array, array.ctypes.data, "DRAM", 0
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here")
    tensor = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    return tensor, tensor.data_ptr(), "VRAM", tensor.device.index or 0


def slot_layout(sizes: list[str]) -> tuple[dict[str, tuple[int, np.ndarray]], int]:
    """{size: (offset of its slots in the arena, the NUM_PAGES slot indices used)}, arena bytes."""
    rng = np.random.default_rng(7)
    layout, offset = {}, 0
    for size in sizes:
        slots = np.sort(rng.choice(NUM_SLOTS, NUM_PAGES, replace=False)).astype(np.int32)
        layout[size] = (offset, slots)
        offset += SIZES[size] * NUM_SLOTS
    return layout, offset


def run_target(args: argparse.Namespace) -> None:
    """The raw target: register the arena, trade metadata on stdin/stdout, wait for EOF."""
    out = protocol_stdout()
    try:
        _, arena_nbytes = slot_layout(args.sizes)
        keep, address, mem, dev = allocate(arena_nbytes, args.remote)
        agent = make_raw_agent("target", args.agents, progress_thread=True)
        agent.register_memory([(address, arena_nbytes, dev, "")], mem)
    except Exception as exc:
        out.write(json.dumps({"error": f"target: {type(exc).__name__}: {exc}"}) + "\n")
        return
    out.write(
        json.dumps(
            {
                "metadata": agent.get_agent_metadata().hex(),
                "address": address,
                "mem": mem,
                "dev": dev,
            }
        )
        + "\n"
    )
    agent.add_remote_agent(bytes.fromhex(sys.stdin.readline().strip()))
    sys.stdin.read()
    del keep


class RawPeer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name = "raw"
        self._target = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "target",
                "--remote",
                args.remote,
                "--agents",
                args.agents,
                "--sizes",
                *args.sizes,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.server_pids = [self._target.pid]
        line = self._target.stdout.readline()
        hello = json.loads(line) if line else {"error": "the target exited"}
        if "error" in hello:
            raise RuntimeError(hello["error"])
        largest = max(SIZES[size] for size in args.sizes)
        self._keep, base, mem, dev = allocate(NUM_PAGES * largest, args.local)
        agent = self._agent = make_raw_agent("initiator", args.agents, progress_thread=False)
        agent.register_memory([(base, NUM_PAGES * largest, dev, "")], mem)
        self._target.stdin.write(agent.get_agent_metadata().hex() + "\n")
        self._target.stdin.flush()
        remote = agent.add_remote_agent(bytes.fromhex(hello["metadata"]))
        layout, _ = slot_layout(args.sizes)
        self._local, self._remote, self._slots = {}, {}, {}
        for size in args.sizes:
            nbytes, (offset, slots) = SIZES[size], layout[size]
            self._local[size] = agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT", [(base + i * nbytes, nbytes, dev) for i in range(NUM_PAGES)], mem
            )
            self._remote[size] = agent.prep_xfer_dlist(
                remote,
                [
                    (hello["address"] + offset + s * nbytes, nbytes, hello["dev"])
                    for s in range(NUM_SLOTS)
                ],
                hello["mem"],
            )
            self._slots[size] = slots
        self._indices = np.arange(NUM_PAGES, dtype=np.int32)
        for size in args.sizes:  # the first transfers wire up the connection
            self.put(size)
            self.get(size)

    def _transfer(self, op: str, size: str) -> float:
        t0 = time.perf_counter()
        handle = self._agent.make_prepped_xfer(
            op, self._local[size], self._indices, self._remote[size], self._slots[size]
        )
        state = self._agent.transfer(handle)
        while state == "PROC":
            state = self._agent.check_xfer_state(handle)
        seconds = time.perf_counter() - t0
        self._agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"NIXL {op}: {state}")
        return seconds

    def put(self, size: str) -> float:
        return self._transfer("WRITE", size)

    def get(self, size: str) -> float:
        return self._transfer("READ", size)

    def lookup(self, num_calls: int) -> list[float]:
        return []

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        self._target.stdin.close()
        self._target.wait(timeout=30)


def start_store(cpu_bytes: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "kvmesh.deploy.cli",
            "store",
            "--port",
            "0",
            "--cpu-bytes",
            str(cpu_bytes),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    match = re.match(r"kvmesh store listening on (\S+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"store did not start: {line!r}")
    return proc, match.group(1)


class KvmeshPeer:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from kvmesh.cachestore import Namespace, StoreClient
        from kvmesh.cachestore.codec import encode_page
        from kvmesh.cachestore.keys import tokens_to_bytes

        self.name, self.path = "kvmesh", args.path
        if args.path == "tensors" and args.local == "vram" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device here")
        self._store, target = start_store(args.cpu_bytes)
        self.server_pids = [self._store.pid]
        if args.path == "shm":
            self.client = StoreClient(target, data_plane="grpc", shared_memory=True)
        else:
            self.client = StoreClient(target, data_plane="nixl", shared_memory=False)
            assert self.client.data_plane == "nixl"
        rng = np.random.default_rng(0)
        self.keys, self.encoded, self.views, self.arena = {}, {}, {}, {}
        for i, size in enumerate(args.sizes):
            model, num_layers, num_kv_heads, head_dim = SHAPES[size]
            ns = Namespace(model, num_layers, num_kv_heads, head_dim, torch.bfloat16)
            assert ns.page_nbytes == SIZES[size], (size, ns.page_nbytes)
            tokens = np.arange(NUM_PAGES * ns.page_size, dtype=np.int32) + 1_000_000 * (i + 1)
            keys = ns.page_keys(tokens)
            payload = rng.integers(0, 256, ns.page_nbytes, dtype=np.uint8).tobytes()
            encoded = [
                (
                    key,
                    encode_page(
                        ns,
                        key,
                        tokens_to_bytes(tokens[p * ns.page_size : (p + 1) * ns.page_size]),
                        payload,
                    ),
                )
                for p, key in enumerate(keys)
            ]
            self.keys[size], self.encoded[size] = keys, encoded
            if args.path == "tensors":  # a worker's registered staging area (host or GPU)
                nbytes = len(encoded[0][1])
                device = "cuda" if args.local == "vram" else "cpu"
                arena = torch.frombuffer(
                    bytearray(b"".join(blob for _, blob in encoded)), dtype=torch.uint8
                ).to(device)
                into = torch.zeros_like(arena)
                if not (self.client.register_memory(arena) and self.client.register_memory(into)):
                    raise RuntimeError("register_memory: the data plane is off")
                self.arena[size] = (arena, into)
                self.views[size] = (
                    [(key, arena[p * nbytes : (p + 1) * nbytes]) for p, key in enumerate(keys)],
                    [into[p * nbytes : (p + 1) * nbytes] for p in range(NUM_PAGES)],
                )
        for size in args.sizes:  # warm up (and check the bytes once, outside the timing)
            self.put(size)
            self.get(size)
            if args.path == "tensors":
                arena, into = self.arena[size]
                assert torch.equal(arena, into), "pages read back differ"
            self.cleanup()

    def put(self, size: str) -> float:
        t0 = time.perf_counter()
        if self.path == "tensors":
            stored = self.client.put_tensor_pages(self.views[size][0])
        else:
            stored = self.client.put_encoded_pages(self.encoded[size])
        seconds = time.perf_counter() - t0
        assert stored == NUM_PAGES, stored
        return seconds

    def get(self, size: str) -> float:
        t0 = time.perf_counter()
        if self.path == "tensors":
            found = self.client.get_pages_into(self.keys[size], self.views[size][1])
            seconds = time.perf_counter() - t0
            assert all(found)
            return seconds
        with self.client.get_pages_leased(self.keys[size]) as lease:
            assert lease.pages[-1] is not None
        return time.perf_counter() - t0

    def lookup(self, num_calls: int) -> list[float]:
        return []

    def cleanup(self) -> None:
        self.client.delete_pages([key for keys in self.keys.values() for key in keys])

    def close(self) -> None:
        self.client.close()
        self._store.terminate()
        self._store.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("driver", "target"), default="driver")
    parser.add_argument("--system", choices=("raw", "kvmesh"), default="raw")
    parser.add_argument("--local", choices=("dram", "vram"), default="dram")
    parser.add_argument("--remote", choices=("dram", "vram"), default="dram")
    parser.add_argument("--agents", choices=("kvmesh", "nixl"), default="kvmesh")
    parser.add_argument("--path", choices=("nixl", "tensors", "shm"), default="nixl")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--cpu-bytes", type=int, default=4 << 30)
    args = parser.parse_args()
    if args.role == "target":
        run_target(args)
    else:
        serve(lambda: (RawPeer if args.system == "raw" else KvmeshPeer)(args))
    # NIXL can segfault tearing its agents down at interpreter exit; all is done by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
