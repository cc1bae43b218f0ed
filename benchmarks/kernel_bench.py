"""Paged decode kernel vs torch SDPA (flash backend, enable_gqa) on contiguous KV, on one GPU.

    python3 benchmarks/kernel_bench.py            # the issue-3 table
    python3 benchmarks/kernel_bench.py --tune     # also sweep tile/launch configs per shape

Shapes: 32 query heads, 8 KV heads, head_dim 128, bf16, page_size 16, shuffled page tables.
Times are triton.testing.do_bench medians (L2 flushed before every call; launch overhead
included, as in eager serving) and, in the "graph" columns, do_bench_cudagraph medians (calls
replayed from one CUDA graph, as in graph-captured decode); inputs rotate over enough copies to
exceed L2. GB/s counts K and V bytes read once; "% copy" compares that
with a device-to-device copy measured in the same run (bytes read + written).
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

from kvmesh.kernels import DecodeConfig, DecodeWorkspace, num_kv_splits, paged_decode, paged_prefill

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
UNIFORM = [(1, 4096), (16, 4096), (64, 2048), (64, 8192), (128, 1024), (8, 32768)]
VARLEN = [(16, 1), (64, 2)]  # (batch, seed): lengths uniform in [64, 8192]
PREFILL = [(4, 4096), (1, 16384)]
ROTATE_BYTES = 512 << 20
TOKEN_BYTES = 2 * NUM_KV_HEADS * HEAD_DIM * 2  # K and V, bf16


def copy_bandwidth() -> float:
    src = torch.randn(1 << 30, device="cuda", dtype=DTYPE)  # 2 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


class Case:
    """One batch in R rotating copies: a shared shuffled page pool and padded contiguous K/V."""

    def __init__(self, seq_lens: list[int], seed: int):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.seq_lens = seq_lens
        self.batch, max_len = len(seq_lens), max(seq_lens)
        self.kv_bytes = sum(seq_lens) * TOKEN_BYTES
        padded_bytes = self.batch * max_len * TOKEN_BYTES
        self.copies = max(1, min(16, math.ceil(ROTATE_BYTES / padded_bytes)))
        max_pages = triton.cdiv(max_len, PAGE_SIZE)
        num_pages = self.copies * self.batch * max_pages
        self.pool = torch.empty(num_pages, 1, 2, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE,
                                device="cuda")
        order = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
        self.page_tables = order.view(self.copies, self.batch, max_pages)
        self.lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        self.qs, self.ks, self.vs = [], [], []
        for r in range(self.copies):
            # k, v: [batch, max_len, kv_heads, head_dim], zero past each length (padding)
            k, v = (torch.randn(self.batch, max_pages * PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM,
                                device="cuda", dtype=DTYPE, generator=gen) for _ in range(2))
            pos = torch.arange(max_pages * PAGE_SIZE, device="cuda")
            pad = (pos[None, :] >= self.lens[:, None].long())[..., None, None]
            k.masked_fill_(pad, 0.0)
            v.masked_fill_(pad, 0.0)
            ids = self.page_tables[r].flatten().long()
            self.pool[ids, 0, 0] = k.view(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
            self.pool[ids, 0, 1] = v.view(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
            # SDPA layout [batch, kv_heads, max_len, head_dim], contiguous
            self.ks.append(k[:, :max_len].transpose(1, 2).contiguous())
            self.vs.append(v[:, :max_len].transpose(1, 2).contiguous())
            self.qs.append(torch.randn(self.batch, NUM_HEADS, HEAD_DIM, device="cuda",
                                       dtype=DTYPE, generator=gen))
        self.scale = HEAD_DIM**-0.5
        self.step = 0
        # preallocated like a serving engine's (and required for CUDA-graph capture)
        self.workspace = DecodeWorkspace.allocate(self.batch, NUM_HEADS, HEAD_DIM, device="cuda")
        self.out = torch.empty_like(self.qs[0])

    def _next(self) -> int:
        self.step = (self.step + 1) % self.copies
        return self.step

    def kernel_fn(self, num_splits: int, config: DecodeConfig | None = None):
        def run():
            r = self._next()
            return paged_decode(self.qs[r], self.pool, 0, self.page_tables[r], self.lens,
                                self.scale, num_splits=num_splits, config=config,
                                workspace=self.workspace, out=self.out)
        return run

    def sdpa_fn(self):
        def run():
            r = self._next()
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    self.qs[r][:, :, None], self.ks[r], self.vs[r], scale=self.scale,
                    enable_gqa=True)[:, :, 0]
        return run

    def max_error(self, num_splits: int) -> float:
        """Kernel vs fp32 attention over each sequence's true length (copy 0)."""
        out = paged_decode(self.qs[0], self.pool, 0, self.page_tables[0], self.lens, self.scale,
                           num_splits=num_splits).float()
        err = 0.0
        for i, n in enumerate(self.seq_lens):
            ref = torch.nn.functional.scaled_dot_product_attention(
                self.qs[0][i, :, None].float(), self.ks[0][i, :, :n].float(),
                self.vs[0][i, :, :n].float(), scale=self.scale, enable_gqa=True)[:, 0]
            err = max(err, (out[i] - ref).abs().max().item())
        return err


def bench(fn, tune: bool = False) -> float:
    return do_bench(fn, warmup=10 if tune else 25, rep=40 if tune else 100,
                    return_mode="median")


def tune_case(name: str, case: Case, log) -> None:
    """Sweep split count x pipeline depth x tile (eager do_bench medians); print the best."""
    rows = []
    splits = [*range(1, 13), 16, 24, 32, 48, 64]
    for block_n, stages, ns in itertools.product((32, 64), (2, 3), splits):
        cfg = DecodeConfig(block_n=block_n, num_warps=4, num_stages=stages)
        rows.append((bench(case.kernel_fn(ns, cfg), tune=True), block_n, stages, ns))
    by_split = {ns: min(r[0] for r in rows if r[3] == ns) for ns in splits}
    log(f"  tune {name} best us per split count: "
        + " ".join(f"{ns}:{ms * 1e3:.0f}" for ns, ms in by_split.items()))
    for ms, block_n, stages, ns in sorted(rows)[:3]:
        log(f"  tune {name}: {ms * 1e3:8.1f} us  block_n={block_n} stages={stages} splits={ns}")


def prefill_row(batch: int, seq_len: int) -> str:
    """Whole-prompt prefill (no cached prefix) vs SDPA flash causal on contiguous q, k, v."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    num_pages = batch * seq_len // PAGE_SIZE
    q, k, v = (torch.randn(batch, seq_len, h, HEAD_DIM, device="cuda", dtype=DTYPE,
                           generator=gen) for h in (NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS))
    pool = torch.empty(num_pages, 1, 2, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda",
                       dtype=DTYPE)
    page_table = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    page_table = page_table.view(batch, -1)
    pool[page_table.flatten().long(), 0, 0] = k.reshape(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
    pool[page_table.flatten().long(), 0, 1] = v.reshape(-1, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seq_len
    lens = torch.full((batch,), seq_len, device="cuda", dtype=torch.int32)
    q_flat, scale = q.reshape(-1, NUM_HEADS, HEAD_DIM), HEAD_DIM**-0.5
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def kernel():
        return paged_prefill(q_flat, pool, 0, page_table, cu, lens, scale, max_q_len=seq_len)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)

    err = (kernel().view(batch, seq_len, NUM_HEADS, HEAD_DIM).float()
           - sdpa().transpose(1, 2).float()).abs().max().item()
    t_kernel, t_sdpa = bench(kernel), bench(sdpa)
    tflops = 2 * 2 * batch * NUM_HEADS * HEAD_DIM * seq_len * seq_len / 2 / 1e12
    return (f"{batch:>5}x{seq_len:<6} {t_kernel:>10.3f} {tflops / t_kernel * 1e3:>7.0f} "
            f"{t_sdpa:>9.3f} {tflops / t_sdpa * 1e3:>7.0f} {t_sdpa / t_kernel:>7.2f}x {err:>8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--log", default=None, help="also write the output to this file")
    args = parser.parse_args()
    sink = open(args.log, "w") if args.log else None  # noqa: SIM115

    def log(line: str) -> None:
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    log(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
        f"triton {triton.__version__}; D2D copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    cases = [(f"{b}x{n}", [n] * b, b * n) for b, n in UNIFORM]
    for b, seed in VARLEN:
        gen = torch.Generator().manual_seed(seed)
        lens = torch.randint(64, 8193, (b,), generator=gen).tolist()
        cases.append((f"varlen {b}", lens, None))
    header = (f"{'shape':>12} {'splits':>6} {'kernel ms':>10} {'GB/s':>7} {'% copy':>7} "
              f"{'SDPA ms':>9} {'GB/s':>7} {'speedup':>8} | {'graph: kernel':>13} "
              f"{'SDPA':>7} {'speedup':>8} {'% copy':>7} | {'max err':>8}")
    rows = []
    for name, lens, _ in cases:
        case = Case(lens, seed=len(rows))
        ns = num_kv_splits(len(lens), DecodeConfig.for_head_dim(HEAD_DIM).kv_blocks(NUM_KV_HEADS),
                           max(lens), props.multi_processor_count, total_tokens=sum(lens))
        if args.tune and len(lens) * NUM_KV_HEADS < 2 * props.multi_processor_count:
            tune_case(name, case, log)
        t_kernel = bench(case.kernel_fn(ns))
        t_sdpa = bench(case.sdpa_fn())
        g_kernel = do_bench_cudagraph(case.kernel_fn(ns), rep=50, return_mode="median")
        g_sdpa = do_bench_cudagraph(case.sdpa_fn(), rep=50, return_mode="median")
        g_copy = case.kv_bytes / (g_kernel * 1e-3) / copy_bw
        gbs = case.kv_bytes / (t_kernel * 1e-3) / 1e9
        # SDPA reads the padded tensors, but is credited with the useful bytes only
        gbs_sdpa = case.kv_bytes / (t_sdpa * 1e-3) / 1e9
        rows.append(f"{name:>12} {ns:>6} {t_kernel:>10.4f} {gbs:>7.0f} "
                    f"{100 * gbs * 1e9 / copy_bw:>6.1f}% {t_sdpa:>9.4f} {gbs_sdpa:>7.0f} "
                    f"{t_sdpa / t_kernel:>7.2f}x | {g_kernel:>13.4f} {g_sdpa:>7.4f} "
                    f"{g_sdpa / g_kernel:>7.2f}x {100 * g_copy:>6.1f}% | "
                    f"{case.max_error(ns):>8.1e}")
        log(rows[-1])
        del case
        torch.cuda.empty_cache()
    log("")
    log("ms are medians; GB/s = K+V bytes of the true lengths / time; varlen SDPA runs flash on "
        "K/V padded to the longest sequence without a mask (a lower bound on its time)")
    log(header)
    for row in rows:
        log(row)
    log("")
    log("prefill (causal, no cached prefix), TFLOP/s counts the causal half")
    log(f"{'shape':>12} {'kernel ms':>10} {'TFLOP/s':>7} {'SDPA ms':>9} {'TFLOP/s':>7} "
        f"{'speedup':>8} {'max err':>8}")
    for batch, seq_len in PREFILL:
        log(prefill_row(batch, seq_len))


if __name__ == "__main__":
    main()
