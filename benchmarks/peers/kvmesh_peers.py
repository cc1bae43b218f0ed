"""kvmesh's own paths as store_bench.py peers, each a StoreClient of one running `kvmesh store`.

- tensors: `put(tokens, kv)` / `get_closest` with kv [num_layers, 2, 2048, num_kv_heads,
  head_dim] bf16 (the store encodes and checks pages; one permute-copy each way);
- raw pages, no shared memory: `put_encoded_pages` / `get_pages_leased` over gRPC frames
  (these four clients say data_plane="grpc": "auto" would take the NIXL plane);
- same-host shared memory: `put_encoded_pages` copying each page once into slots of the
  server's shared arenas (ReservePages(shared_memory) + copy + CommitPages, every page checked
  by the server before it is visible), then `get_pages_leased` into this client's segment (the
  server checks and copies), or `mapped=True` (views into the server's arenas; this client
  checks every page header and xxh3 checksum, as the contract asks, and then
  `lease.is_valid()`);
- the NIXL data plane, where StoreClient offers one (`data_plane`), else n/a; shared memory
  off, so its puts are NIXL WRITEs too (on this host they would take the arenas' path).
Pages are encoded once, before timing (a worker encodes as it offloads); GB/s counts payload
bytes, the same bytes every peer moves. The mapped peer's put is the shm peer's path, not one
of its own (`put_is_own_path`).
"""

from __future__ import annotations

import inspect
import time

import numpy as np
import torch
from peer_protocol import NUM_PAGES, SIZES, page_buffer, timed

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.codec import check_page_header, checksum, encode_page
from kvmesh.cachestore.keys import tokens_to_bytes

SHAPES = {"0.37MB": ("SmolLM2-135M", 30, 3, 64), "2MiB": ("Llama-3-8B", 32, 8, 128)}


class Pages:
    """Per page size: the namespace, a 2,048-token prompt and its NUM_PAGES encoded pages."""

    def __init__(self) -> None:
        buffer = page_buffer()
        self.ns, self.tokens, self.keys, self.token_bytes, self.encoded = {}, {}, {}, {}, {}
        for i, (size, (model, num_layers, num_kv_heads, head_dim)) in enumerate(SHAPES.items()):
            ns = Namespace(model, num_layers, num_kv_heads, head_dim, torch.bfloat16)
            assert ns.page_nbytes == SIZES[size]
            tokens = np.arange(NUM_PAGES * ns.page_size, dtype=np.int32) + 1_000_000 * (i + 1)
            keys = ns.page_keys(tokens)
            token_bytes = [
                tokens_to_bytes(tokens[p * ns.page_size : (p + 1) * ns.page_size])
                for p in range(NUM_PAGES)
            ]
            payloads = [
                memoryview(buffer)[p * ns.page_nbytes : (p + 1) * ns.page_nbytes]
                for p in range(NUM_PAGES)
            ]
            self.ns[size], self.tokens[size], self.keys[size] = ns, tokens, keys
            self.token_bytes[size] = token_bytes
            self.encoded[size] = [
                (key, encode_page(ns, key, tb, payload))
                for key, tb, payload in zip(keys, token_bytes, payloads, strict=True)
            ]


class KvmeshPeer:
    """Key-level pages: put_encoded_pages, then get_pages_leased (inline frames by default)."""

    put_is_own_path = True

    def __init__(self, name: str, client: StoreClient, pages: Pages, server_pid: int) -> None:
        self.name, self.client, self.pages = name, client, pages
        self.server_pids = [server_pid]

    def put(self, size: str) -> float:
        t0 = time.perf_counter()
        stored = self.client.put_encoded_pages(self.pages.encoded[size])
        seconds = time.perf_counter() - t0
        assert stored == NUM_PAGES, stored
        return seconds

    def get(self, size: str) -> float:
        t0 = time.perf_counter()
        with self.client.get_pages_leased(self.pages.keys[size]) as lease:
            assert lease.pages[-1] is not None
        return time.perf_counter() - t0

    def lookup(self, num_calls: int) -> list[float]:
        size = "0.37MB"
        tokens, ns = self.pages.tokens[size], self.pages.ns[size]
        if self.client.lookup(tokens, ns).num_tokens < len(tokens):
            self.client.put_encoded_pages(self.pages.encoded[size])
        assert self.client.lookup(tokens, ns).num_tokens == len(tokens)
        return [timed(self.client.lookup, tokens, ns) for _ in range(num_calls)]

    def stats_floor(self, num_calls: int) -> list[float]:
        """Stats does no store work: the gRPC round trip alone."""
        return [timed(self.client.stats) for _ in range(num_calls)]

    def cleanup(self) -> None:
        self.client.delete_pages([key for size in SIZES for key in self.pages.keys[size]])

    def close(self) -> None:
        self.client.close()


class TensorPeer(KvmeshPeer):
    def __init__(self, client: StoreClient, pages: Pages, server_pid: int) -> None:
        super().__init__("kvmesh put/get_closest, tensor API", client, pages, server_pid)
        self.kv = {}  # size -> [num_layers, 2, 2048, num_kv_heads, head_dim] bf16
        for size, ns in pages.ns.items():
            shape = (ns.num_layers, 2, NUM_PAGES * ns.page_size, ns.num_kv_heads, ns.head_dim)
            self.kv[size] = torch.randn(shape).to(torch.bfloat16)

    def put(self, size: str) -> float:
        t0 = time.perf_counter()
        stored = self.client.put(self.pages.tokens[size], self.kv[size], self.pages.ns[size])
        seconds = time.perf_counter() - t0
        assert stored == NUM_PAGES, stored
        return seconds

    def get(self, size: str) -> float:
        t0 = time.perf_counter()
        got = self.client.get_closest(self.pages.tokens[size], self.pages.ns[size])
        seconds = time.perf_counter() - t0
        assert got is not None and got.num_tokens == NUM_PAGES * 16
        return seconds

    def cleanup(self) -> None:
        for size in SIZES:
            self.client.delete(self.pages.tokens[size], self.pages.ns[size])


class MappedPeer(KvmeshPeer):
    put_is_own_path = False

    def get(self, size: str) -> float:
        ns, keys = self.pages.ns[size], self.pages.keys[size]
        token_bytes = self.pages.token_bytes[size]
        t0 = time.perf_counter()
        with self.client.get_pages_leased(keys, mapped=True) as lease:
            assert lease.valid_until is not None, "not mapped"
            for page, key, tb in zip(lease.pages, keys, token_bytes, strict=True):
                payload, recorded = check_page_header(page, ns, key, tb)
                assert checksum(payload) == recorded
            assert lease.is_valid()
        return time.perf_counter() - t0


def data_plane_client(target: str) -> StoreClient | str:
    """A StoreClient on the NIXL data plane for gets and puts (shared memory off), or why there
    is none."""
    has_arg = "data_plane" in inspect.signature(StoreClient.__init__).parameters
    if not has_arg and not hasattr(StoreClient, "data_plane"):
        return "StoreClient has no data_plane (kvmesh at HEAD)"
    try:
        return StoreClient(target, data_plane="nixl", shared_memory=False)  # type: ignore[call-arg]
    except Exception as exc:  # the colleague's API may differ: report, do not fail the run
        return f"StoreClient(data_plane='nixl') failed: {type(exc).__name__}: {exc}"


def frames_client(target: str, shared_memory: bool) -> StoreClient:
    """A StoreClient whose bytes go by gRPC frames (and /dev/shm), never the data plane: with
    data_plane "auto" (the default) the "raw" and "shm" rows would measure NIXL too."""
    if "data_plane" in inspect.signature(StoreClient.__init__).parameters:
        return StoreClient(target, shared_memory=shared_memory, data_plane="grpc")
    return StoreClient(target, shared_memory=shared_memory)


def kvmesh_peers(target: str, server_pid: int) -> tuple[list[KvmeshPeer], list[str]]:
    """Every kvmesh path against the store at `target`, and notes on those skipped."""
    pages = Pages()
    raw = KvmeshPeer(
        "kvmesh raw pages, no shm", frames_client(target, shared_memory=False), pages, server_pid
    )
    shm = KvmeshPeer(
        "kvmesh shm: put into arena slots, get_pages_leased segment",
        frames_client(target, True),
        pages,
        server_pid,
    )
    peers = [
        TensorPeer(frames_client(target, shared_memory=False), pages, server_pid),
        raw,
        shm,
        MappedPeer(
            "kvmesh get_pages_leased mapped + check", frames_client(target, True), pages,
            server_pid,
        ),
    ]
    plane = data_plane_client(target)
    if isinstance(plane, str):
        return peers, [f"kvmesh NIXL data plane: n/a ({plane})"]
    return [*peers, KvmeshPeer("kvmesh NIXL data plane", plane, pages, server_pid)], []
