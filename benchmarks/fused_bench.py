"""Fused rms_norm, rotary, silu_and_mul vs the eager torch chains they replace in Llama.

    python3 benchmarks/fused_bench.py [--out DIR]   # CUDA: Llama-3.2-1B and Llama-3-8B shapes, bf16
    python3 benchmarks/fused_bench.py --smoke       # tiny shapes, also on CPU (Triton interpreter)

The torch chains are the ops of workers/models/layers.py before fusion: RMSNorm's forward (with
the residual add as a separate op), q * cos + rotate_half(q) * sin for q and k (cos/sin rows
gathered once per forward, so not timed), F.silu(gate) * up. "eager" columns are
triton.testing.do_bench medians (L2 flushed, launch overhead included); "graph" columns are
do_bench_cudagraph medians (replayed from one CUDA graph, as in graph-captured decode).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvmesh.kernels import rms_norm, rotary, silu_and_mul
from kvmesh.kernels.reference import rotate_half


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    inter: int


SHAPES = [
    Shape("llama-3.2-1b", 2048, 32, 8, 64, 8192),
    Shape("llama-3-8b", 4096, 32, 8, 128, 14336),
]
TOKENS = [1, 32, 64, 8192]
SMOKE_SHAPES = [Shape("tiny", 64, 4, 2, 32, 96)]
SMOKE_TOKENS = [1, 5]
EPS = 1e-5
MAX_POSITIONS = 8192


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_tables(head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.arange(MAX_POSITIONS).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def cases(shape: Shape, num_tokens: int, dtype: torch.dtype, device: str):
    """Yield (op, torch_fn, fused_fn, check) per op; check() compares one call of each."""
    gen = torch.Generator(device=device).manual_seed(num_tokens)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device).to(dtype)

    x, residual = randn(num_tokens, shape.hidden), randn(num_tokens, shape.hidden)
    weight = 1 + 0.1 * randn(shape.hidden)
    yield (
        "rms_norm",
        lambda: torch_rms_norm(x, weight, EPS),
        lambda: rms_norm(x, weight, EPS),
        lambda: (torch_rms_norm(x, weight, EPS), rms_norm(x, weight, EPS)),
    )

    def torch_add_norm():
        s = x + residual
        return torch_rms_norm(s, weight, EPS), s

    def check_add_norm():
        expected, _ = torch_add_norm()
        return expected, rms_norm(x, weight, EPS, residual=residual.clone())[0]

    yield (
        "add_rms_norm",
        torch_add_norm,
        lambda: rms_norm(x, weight, EPS, residual=residual),
        check_add_norm,
    )

    q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size)
    q = qkv[:, :q_size].view(num_tokens, shape.num_heads, shape.head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, shape.num_kv_heads, shape.head_dim)
    cos_cache, sin_cache = rope_tables(shape.head_dim, device)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen, device=device)
    # gathered once per forward in the model, so outside the timed torch chain
    cos = cos_cache[positions].to(dtype)[:, None, :]
    sin = sin_cache[positions].to(dtype)[:, None, :]

    def torch_rope():
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def check_rope():
        expected, _ = torch_rope()
        q_copy, k_copy = q.clone(), k.clone()
        rotary(q_copy, k_copy, positions, cos_cache, sin_cache)
        return expected, q_copy

    yield (
        "rotary",
        torch_rope,
        lambda: rotary(q, k, positions, cos_cache, sin_cache),
        check_rope,
    )

    gate_up = randn(num_tokens, 2 * shape.inter)
    gate, up = gate_up.split(shape.inter, dim=-1)
    yield (
        "silu_and_mul",
        lambda: F.silu(gate) * up,
        lambda: silu_and_mul(gate_up),
        lambda: (F.silu(gate) * up, silu_and_mul(gate_up)),
    )


def time_us(fn: Callable[[], object], device: str, graph: bool) -> float:
    if device == "cpu":  # smoke: the interpreter only shows that it runs
        start = time.perf_counter()
        for _ in range(2):
            fn()
        return (time.perf_counter() - start) / 2 * 1e6
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
    else:
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU too")
    ap.add_argument("--out", type=Path, default=None, help="write fused_bench.json here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("needs CUDA; use --smoke on CPU")
    shapes, token_counts = (SMOKE_SHAPES, SMOKE_TOKENS) if args.smoke else (SHAPES, TOKENS)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    graph = device == "cuda"
    rows = []
    header = "| op | shape | tokens | torch µs | fused µs | speedup |"
    if graph:
        header += " torch graph µs | fused graph µs | graph speedup |"
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for shape in shapes:
        for num_tokens in token_counts:
            for op, torch_fn, fused_fn, check in cases(shape, num_tokens, dtype, device):
                expected, actual = check()
                torch.testing.assert_close(actual, expected, atol=3e-2, rtol=3e-2)
                row = dict(op=op, shape=shape.name, tokens=num_tokens)
                row["torch_us"] = time_us(torch_fn, device, graph=False)
                row["fused_us"] = time_us(fused_fn, device, graph=False)
                line = (
                    f"| {op} | {shape.name} | {num_tokens} | {row['torch_us']:.1f} | "
                    f"{row['fused_us']:.1f} | {row['torch_us'] / row['fused_us']:.2f}x |"
                )
                if graph:
                    row["torch_graph_us"] = time_us(torch_fn, device, graph=True)
                    row["fused_graph_us"] = time_us(fused_fn, device, graph=True)
                    line += (
                        f" {row['torch_graph_us']:.1f} | {row['fused_graph_us']:.1f} | "
                        f"{row['torch_graph_us'] / row['fused_graph_us']:.2f}x |"
                    )
                print(line, flush=True)
                rows.append(row)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        result = dict(
            device=device_name,
            dtype=str(dtype),
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            smoke=args.smoke,
            rows=rows,
        )
        (args.out / "fused_bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
