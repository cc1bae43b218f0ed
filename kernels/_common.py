"""Shared Triton helpers and launcher-side checks for the paged kernels.

Index math is int64: a pool can hold more than 2^31 elements, and page_id * stride_page would
wrap in int32 (page ids come from an int32 page table).
"""

from __future__ import annotations

import functools
import os
import sys

import torch

# Without a CUDA device Triton kernels can only run in its interpreter; the flag is read when
# each @triton.jit function (Triton's own tl.zeros etc. included) is defined, so it must be set
# before Triton is first imported.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "Triton was imported before kernels without TRITON_INTERPRET=1 on a machine "
            "without CUDA; set TRITON_INTERPRET=1 before anything imports triton"
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kvmesh.kernels.reference import check_gqa  # noqa: E402


def _version(text: str | None) -> tuple[int, ...]:
    parts = []
    for part in (text or "0").split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


@functools.cache
def _pdl_on(device_index: int) -> bool:
    # Triton has the grid-dependency ops from 3.4; CUDA graphs capture dependent launches from
    # CUDA 12.3
    if os.environ.get("KVMESH_PDL", "1") == "0" or _version(triton.__version__) < (3, 4) \
            or _version(torch.version.cuda) < (12, 3):
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (Hopper and newer,
    Triton >= 3.4, CUDA >= 12.3; the environment variable KVMESH_PDL=0, read once, turns it
    off). Such a kernel may start while the one before it in the stream
    finishes: it must call `pdl_wait` before touching global memory (see there)."""
    return device.type == "cuda" and _pdl_on(device.index if device.index is not None
                                             else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict:
    """Launch arguments of a kernel that starts with `pdl_wait(USE_PDL)`."""
    return {"USE_PDL": True, "launch_pdl": True} if use_pdl(device) else {"USE_PDL": False}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """First thing in a kernel launched with programmatic dependent launch: wait until the
    kernel before it is done and its writes are visible (as an ordinary launch would), then
    let the next kernel launch. Only launch latency overlaps, never memory traffic, so every
    read-after-write and write-after-read order of the stream holds."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ptrs (CUDA only; nothing comes back, nothing faults).
    Only for memory no earlier kernel is writing: a kernel may issue it before `pdl_wait`."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def kv_token_offset(page_id, token_in_page, stride_page, stride_token):
    """Element offset of a token's row in one (layer, K|V) plane of the pool, as int64."""
    return page_id.to(tl.int64) * stride_page + token_in_page.to(tl.int64) * stride_token


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; fp16/bf16 use tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_pool(kv_pool: torch.Tensor, layer: int, q: torch.Tensor) -> tuple[int, int, int]:
    """Validate pool/query agreement; return (page_size, num_kv_heads, group_size)."""
    if kv_pool.dim() != 6 or kv_pool.shape[2] != 2:
        raise ValueError(
            "kv_pool must be [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim], "
            f"got {tuple(kv_pool.shape)}"
        )
    if not 0 <= layer < kv_pool.shape[1]:
        raise ValueError(f"layer {layer} out of range for {kv_pool.shape[1]} layers")
    if q.dim() != 3 or q.shape[2] != kv_pool.shape[5]:
        raise ValueError(f"q must be [tokens, num_heads, {kv_pool.shape[5]}], got {tuple(q.shape)}")
    if q.dtype != kv_pool.dtype or q.device != kv_pool.device:
        raise ValueError("q and kv_pool must share dtype and device")
    if kv_pool.stride(5) != 1 or q.stride(2) != 1:
        raise ValueError("head_dim must be the innermost contiguous dimension")
    head_dim = kv_pool.shape[5]
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    group = check_gqa(q.shape[1], kv_pool.shape[4])
    return kv_pool.shape[3], kv_pool.shape[4], group


def check_index_tensor(name: str, t: torch.Tensor, dim: int, device: torch.device) -> None:
    if t.dim() != dim or t.dtype != torch.int32 or t.device != device:
        raise ValueError(f"{name} must be a {dim}-d int32 tensor on {device}")


# ---- checks shared by the fused elementwise kernels (fused.py, rotary.py) ----

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_warps_for(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4 if block >= 512 else 2


def check_float(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dim() != dim or t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a {dim}-d float32/float16/bfloat16 tensor, got {t.dim()}-d {t.dtype}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def check_like(name: str, t: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must match dtype {like.dtype} and device {like.device}, "
            f"got {t.dtype} on {t.device}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
