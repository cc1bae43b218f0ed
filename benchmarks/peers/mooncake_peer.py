"""Mooncake Store over TCP or over same-host shared memory, as a store_bench.py peer (run in
the peers' venv, see setup.sh).

--transport tcp (default): three processes, all on loopback: `mooncake_master` (metadata), a
segment holder (a MooncakeDistributedStore that mounts --segment-bytes of memory: where the
pages land, the "server") and this driver (a client that mounts nothing). Puts and gets move
NUM_PAGES pages between one registered client buffer and the segment with `batch_put_from` /
`batch_get_into` (TCP transport, P2P handshake: no etcd).

--transport shm: Mooncake's same-host path (its "dummy client" mode): `mooncake_master`, a
`mooncake_client` (the "real client", which owns the --segment-bytes segment; TCP transport,
P2P handshake) and this driver as a dummy client (`setup_dummy`). The driver's buffer comes
from `alloc_from_mem_pool`: memfd memory whose fd the dummy client hands to the real client
over its Unix socket (`@mooncake_client_<port>.sock`), which maps it. `batch_put_from` /
`batch_get_into` are then one RPC each to the real client, which memcpys between the mapped
buffer and its segment (TransferSubmitter's LOCAL_MEMCPY: `MC_STORE_MEMCPY` unset means on
for a TCP-only engine). The page bytes never cross a socket.

Lookup (both): `batch_is_exist` of LOOKUP_KEYS stored keys.

    python benchmarks/peers/mooncake_peer.py [--transport tcp|shm] [--segment-bytes N]
    (speaks peer_protocol)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import subprocess
import sys
import time

import numpy as np
from peer_protocol import LOOKUP_KEYS, NUM_PAGES, SIZES, free_port, page_buffer, serve, timed


def mooncake_store(master: str, segment_bytes: int):  # -> MooncakeDistributedStore
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    # local_hostname, metadata_server, global_segment_size, local_buffer_size, protocol,
    # rdma_devices, master_server_addr
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", segment_bytes, 64 << 20, "tcp", "", master)
    if rc != 0:
        raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")
    return store


def hold_segment(master: str, segment_bytes: int) -> None:
    """The segment holder: mount the segment, say so, wait for stdin to close."""
    store = mooncake_store(master, segment_bytes)
    print("ready", flush=True)
    sys.stdin.read()
    store.close()


def start_master() -> tuple[subprocess.Popen, str]:
    bindir = os.path.dirname(sys.executable)
    master = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            os.path.join(bindir, "mooncake_master"),
            f"--rpc_port={master.split(':')[1]}",
            f"--metrics_port={free_port()}",
        ],
        stdout=sys.stderr,
    )
    time.sleep(1.0)  # the master has no readiness line; setup retries briefly anyway
    return proc, master


def start_real_client(master: str, segment_bytes: int) -> tuple[subprocess.Popen, int]:
    """`mooncake_client` owning the segment; returns it and its RPC port once that listens."""
    port = free_port()
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mooncake_client"),
            "--host=127.0.0.1",
            f"--port={port}",
            "--metadata_server=P2PHANDSHAKE",
            f"--master_server_address={master}",
            f"--global_segment_size={segment_bytes}",
            "--protocol=tcp",
        ],
        stdout=sys.stderr,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mooncake_client exited with rc {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mooncake_client did not listen within 30 s")


class MooncakePeer:
    def __init__(self, segment_bytes: int, transport: str = "tcp") -> None:
        self.name = {
            "tcp": "Mooncake Store over TCP",
            "shm": "Mooncake Store over shared memory (dummy client + mooncake_client)",
        }[transport]
        self._master, master = start_master()
        try:
            nbytes = NUM_PAGES * max(SIZES.values())
            if transport == "shm":
                from mooncake.store import MooncakeDistributedStore

                self._holder, port = start_real_client(master, segment_bytes)
                self._store = MooncakeDistributedStore()
                rc = self._store.setup_dummy(nbytes + (64 << 20), 16 << 20, f"127.0.0.1:{port}")
                if rc != 0:
                    raise RuntimeError(f"setup_dummy returned {rc}")
                base = self._store.alloc_from_mem_pool(nbytes)  # memfd, mapped by the real client
                if not base:
                    raise RuntimeError("alloc_from_mem_pool returned 0")
                self._buffer = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(base))
                self._buffer[:] = page_buffer()
            else:
                self._holder = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--role",
                        "segment",
                        "--master",
                        master,
                        "--segment-bytes",
                        str(segment_bytes),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                if self._holder.stdout.readline().strip() != "ready":
                    raise RuntimeError("the Mooncake segment holder did not start")
                self._store = mooncake_store(master, 0)
                self._buffer = page_buffer()
            self.server_pids = [self._master.pid, self._holder.pid]
            rc = self._store.register_buffer(self._buffer.ctypes.data, self._buffer.nbytes)
            if rc != 0:
                raise RuntimeError(f"register_buffer returned {rc}")
        except BaseException:  # stop what started, or mooncake_master outlives the driver
            for proc in (getattr(self, "_holder", None), self._master):
                if proc is not None:
                    proc.kill()
                    proc.wait()
            raise
        self._lookup_keys: list[str] = []

    def _batch(self, size: str) -> tuple[list[str], list[int], list[int]]:
        nbytes, base = SIZES[size], self._buffer.ctypes.data
        keys = [f"{size}/{i}" for i in range(NUM_PAGES)]
        return keys, [base + i * nbytes for i in range(NUM_PAGES)], [nbytes] * NUM_PAGES

    def put(self, size: str) -> float:
        batch = self._batch(size)
        t0 = time.perf_counter()
        codes = self._store.batch_put_from(*batch)
        seconds = time.perf_counter() - t0
        if any(code != 0 for code in codes):
            raise RuntimeError(f"batch_put_from: {codes[:4]}")
        return seconds

    def get(self, size: str) -> float:
        batch = self._batch(size)
        t0 = time.perf_counter()
        got = self._store.batch_get_into(*batch)
        seconds = time.perf_counter() - t0
        if any(n != SIZES[size] for n in got):
            raise RuntimeError(f"batch_get_into: {got[:4]}")
        return seconds

    def lookup(self, num_calls: int) -> list[float]:
        if not self._lookup_keys:
            self._lookup_keys = [f"lookup/{i}" for i in range(LOOKUP_KEYS)]
            base = self._buffer.ctypes.data
            self._store.batch_put_from(
                self._lookup_keys, [base] * LOOKUP_KEYS, [4096] * LOOKUP_KEYS
            )
        assert all(x == 1 for x in self._store.batch_is_exist(self._lookup_keys))
        return [timed(self._store.batch_is_exist, self._lookup_keys) for _ in range(num_calls)]

    def cleanup(self) -> None:
        keys = [key for size in SIZES for key in self._batch(size)[0]]
        self._store.batch_remove(keys, True)  # force: a get's read lease would otherwise hold

    def close(self) -> None:
        self._store.close()
        if self._holder.stdin:  # the segment holder stops when its stdin closes
            self._holder.stdin.close()
        else:
            self._holder.terminate()
        self._holder.wait(timeout=30)
        self._master.terminate()
        self._master.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("driver", "segment"), default="driver")
    parser.add_argument("--master", help="(segment role) master address")
    parser.add_argument("--transport", choices=("tcp", "shm"), default="tcp")
    parser.add_argument("--segment-bytes", type=int, default=640 << 20)
    args = parser.parse_args()
    if args.role == "segment":
        hold_segment(args.master, args.segment_bytes)
    else:
        serve(lambda: MooncakePeer(args.segment_bytes, args.transport))


if __name__ == "__main__":
    main()
