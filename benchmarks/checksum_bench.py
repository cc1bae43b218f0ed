"""Verifying a prefix hit's pages: xxh3_64 on the GPU over the copied rows (kernels.xxh3) vs on
the CPU bulk pool over the page-locked sources (what the worker did before), and the
host-to-device copy they go with.

For each page size (Llama-3.2-1B bf16: 512 KiB; Llama-3-8B: 2 MiB), N pages in page-locked
host memory (an 8K-token prefix: 512 pages):

  h2d per page    one cudaMemcpyAsync per page (queued in reverse, so no run merges), to done
  h2d 2-D         the same pages in order: copy_async merges them into one cudaMemcpy2DAsync
  h2d CpuTier     encoded pages stored in a pinned CpuTier (arena slots, headers between the
                  payloads), their payloads copied as kv_upload does (2-D runs), to done
  gpu xxh3        xxh3_64_rows over the rows on the device, to done
  cpu xxh3 pool   checksum_at over the sources on the bulk pool (ChunkedTasks, 4 MB tasks)
  copy + gpu      the copy, then the GPU checksums (the worker's path now)
  copy || cpu     the copy queued while the pool checksums (the worker's path before)

Medians of --repeats; every GPU checksum is also compared with python-xxhash's.

    python3 benchmarks/checksum_bench.py [--pages 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvmesh.cachestore import Namespace
from kvmesh.cachestore.bulk_pool import ChunkedTasks
from kvmesh.cachestore.codec import checksum_at, encode_page
from kvmesh.cachestore.keys import tokens_to_bytes
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.tiers.cpu import CpuTier
from kvmesh.kernels.xxh3 import as_int64, xxh3_64_rows
from kvmesh.workers.runner.cuda_host import copy_async, cudart


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:] if len(times) > 1 else times)


def bench_size(name: str, page_nbytes: int, args: argparse.Namespace) -> None:
    lib = cudart()
    stream = torch.cuda.current_stream()
    words = page_nbytes // 8
    src = torch.randint(-(2**62), 2**62, (args.pages, words), dtype=torch.int64)
    src = src.pin_memory()
    rows = torch.empty_like(src, device="cuda")
    want = [checksum_at(src[i].data_ptr(), page_nbytes) for i in range(args.pages)]
    pairs = [(rows[i].data_ptr(), src[i].data_ptr()) for i in range(args.pages)]

    def copy() -> None:
        copy_async(lib, pairs, page_nbytes, stream)

    def copy_per_page() -> None:
        copy_async(lib, pairs[::-1], page_nbytes, stream)

    tier_pairs = _tier_payloads(src, rows)

    def copy_from_tier() -> None:
        copy_async(lib, tier_pairs, page_nbytes, stream)

    def gpu() -> None:
        xxh3_64_rows(rows)

    def cpu() -> list:
        def verify(indices: range) -> list[bool]:
            return [checksum_at(pairs[i][1], page_nbytes) == want[i] for i in indices]

        with ChunkedTasks(verify, args.pages, args.pages * page_nbytes, 4 << 20) as tasks:
            return [ok for _, part in tasks for ok in part]

    def copy_then_gpu() -> None:
        copy()
        xxh3_64_rows(rows).cpu()

    def copy_with_cpu() -> None:
        copy()
        assert all(cpu())

    copy()
    torch.cuda.synchronize()
    assert xxh3_64_rows(rows).cpu().tolist() == [as_int64(w) for w in want]
    ms = {k: timed(f, args.repeats) for k, f in (("per_page", copy_per_page), ("copy", copy),
                                                 ("tier", copy_from_tier), ("gpu", gpu),
                                                 ("cpu", cpu), ("copy_gpu", copy_then_gpu),
                                                 ("copy_cpu", copy_with_cpu))}
    mb = args.pages * page_nbytes / 1e6
    print(f"| {name} | {mb:.0f} | {ms['per_page']:.2f} | {ms['copy']:.2f} | {ms['tier']:.2f} | "
          f"{ms['gpu']:.3f} | {ms['cpu']:.2f} | {ms['copy_gpu']:.2f} | {ms['copy_cpu']:.2f} | "
          f"{mb / ms['gpu']:.0f} |", flush=True)


def _tier_payloads(src: torch.Tensor, rows: torch.Tensor) -> list[tuple[int, int]]:
    """(row address, payload address) of src's pages stored as encoded pages in a pinned
    CpuTier; the tier is kept alive on the function (the addresses point into it)."""
    ns = Namespace("bench", num_layers=1, num_kv_heads=1, head_dim=src.shape[1] * 2,
                   dtype="bfloat16", page_size=1)
    tier = CpuTier(2 * src.numel() * 8)
    keys = [i.to_bytes(16, "little") for i in range(len(src))]
    tier.put_many([(key, encode_page(ns, key, tokens_to_bytes([i]), src[i].numpy().tobytes()))
                   for i, key in enumerate(keys)])
    pages = tier.get_many(keys)
    _tier_payloads.keep = (tier, pages)
    offset = len(pages[0]) - src[0].numel() * 8
    return [(rows[i].data_ptr(), segments.buffer_address(page)[0] + offset)
            for i, page in enumerate(pages)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, {args.pages} pages, median of "
          f"{args.repeats}\n")
    print("| page | MB | h2d per page ms | h2d 2-D ms | h2d CpuTier ms | gpu xxh3 ms "
          "| cpu xxh3 pool ms | copy + gpu ms | copy \\|\\| cpu ms | GB/s gpu xxh3 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, page_nbytes in (("1B 512 KiB", 512 << 10), ("8B 2 MiB", 2 << 20)):
        bench_size(name, page_nbytes, args)


if __name__ == "__main__":
    main()
