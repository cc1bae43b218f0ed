"""The store's side of a shared-memory GetPages, without gRPC: read the pages from a CPU tier,
check them (codec header, key, xxh3 checksum) and write them into a client's segment.

  check, then copy   PageAccess.get (checks the stored bytes) + SegmentWriter.write_pages
  copy, then check   PageAccess.get(verify=False) + write_pages(keys=...), which checks each
                     page on its copy in the segment right after copying it (what the server does)

Both paths take turns, best of --repeats; the first repeat (segment pages first touched) is
dropped. Default pages: Llama-3.2-1B bf16 (16 layers x 2 x 16 tokens x 8 heads x 64 = 512 KiB),
512 of them (an 8K-token prefix); `--layers 32 --head-dim 128`: Llama-3-8B pages (2 MiB).

    python3 benchmarks/shm_get_bench.py [--pages 512] [--repeats 6] [--layers 32 --head-dim 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kvmesh.cachestore import Namespace
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.keys import tokens_to_bytes
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.server import SegmentWriter
from kvmesh.cachestore.store.page_access import PageAccess
from kvmesh.cachestore.store.tiered import TieredStore
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.v1 import store_pb2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--layers", type=int, default=16, help="32 with --head-dim 128: 8B pages")
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    ns = Namespace("bench", num_layers=args.layers, num_kv_heads=8, head_dim=args.head_dim,
                   dtype="bfloat16", page_size=16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, args.pages * 16).tolist()
    keys = ns.page_keys(tokens)
    tier = CpuTier(2 * args.pages * (ns.page_nbytes + 4096))
    tier.put_many([(key, encode_page(ns, key, tokens_to_bytes(tokens[16 * i : 16 * i + 16]),
                                     rng.bytes(ns.page_nbytes)))
                   for i, key in enumerate(keys)])
    access = PageAccess(TieredStore([tier]))
    nbytes = sum(len(blob) for blob in tier.get_many(keys))
    segment = segments.create_segment(nbytes + (2 << 20))
    target = store_pb2.SharedMemorySegment(name=segment.name, capacity=segment.capacity)
    writer, peer = SegmentWriter(), "ipv4:127.0.0.1:1"
    times: dict[str, list[float]] = {"check, then copy": [], "copy, then check": []}
    try:
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            first = writer.write_pages(target, access.get(keys), peer)
            t1 = time.perf_counter()
            second = writer.write_pages(target, access.get(keys, verify=False), peer, keys,
                                        on_bad=access.delete)
            t2 = time.perf_counter()
            assert list(first.page_offsets) == list(second.page_offsets) and all(second.is_found)
            times["check, then copy"].append(t1 - t0)
            times["copy, then check"].append(t2 - t1)
    finally:
        writer.close()
        segment.close()
        segments.unlink_quietly(segment.path)
    print(f"{args.pages} pages of {ns.page_nbytes >> 10} KiB, {nbytes / 1e6:.0f} MB, best of "
          f"{args.repeats}\n")
    print("| path | ms | GB/s |\n|---|---:|---:|")
    for name, values in times.items():
        best = min(values[1:])
        print(f"| {name} | {1e3 * best:.1f} | {nbytes / best / 1e9:.1f} |")


if __name__ == "__main__":
    main()
