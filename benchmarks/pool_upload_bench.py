"""Staged prefix pages into their pool pages on the device: kernels.scatter_rows vs torch's
index_copy_ (what pool_copies.upload_pages used before).

For each page size (Llama-3.2-1B bf16: 512 KiB; Llama-3-8B: 2 MiB), N staged rows (an
8K-token prefix: 512 pages) go into a pool of 4N pages, to page ids in descending order (what
a freshly released pool hands out) and in random order. CUDA-event medians of --repeats;
GB/s counts the bytes of the rows moved (each is read once and written once). Every result is
compared with index_copy_'s.

    python3 benchmarks/pool_upload_bench.py [--pages 512] [--repeats 21]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kvmesh.kernels.scatter_rows import scatter_rows


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(n: int, page_elems: int, order: str, repeats: int) -> tuple[float, float, float]:
    """(GB of rows, index_copy_ ms, scatter_rows ms) for n bf16 rows into a pool of 4n."""
    src = torch.randn(n, page_elems, device="cuda").to(torch.bfloat16)
    pool = torch.zeros(4 * n, page_elems, dtype=torch.bfloat16, device="cuda")
    if order == "descending":
        ids = torch.arange(4 * n - 1, 3 * n - 1, -1, device="cuda")
    else:
        ids = torch.randperm(4 * n, device="cuda")[:n]
    want = pool.clone().index_copy_(0, ids, src)
    scatter_rows(pool, ids, src)
    assert torch.equal(pool, want), "scatter_rows differs from index_copy_"
    t_index = timed(lambda: pool.index_copy_(0, ids, src), repeats)
    t_scatter = timed(lambda: scatter_rows(pool, ids, src), repeats)
    return src.numel() * src.element_size() / 1e9, t_index, t_scatter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, {args.pages} pages, "
          f"median of {args.repeats}")
    print("| pages | pool ids | index_copy_ ms | GB/s | scatter_rows ms | GB/s | speedup |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, page_elems in (("1B 512 KiB", 256 << 10), ("8B 2 MiB", 1 << 20)):
        for order in ("descending", "random"):
            gb, ti, ts = measure(args.pages, page_elems, order, args.repeats)
            print(f"| {label} | {order} | {ti:.3f} | {gb / ti * 1e3:.0f} | {ts:.3f} | "
                  f"{gb / ts * 1e3:.0f} | {ti / ts:.1f}x |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
