"""Triton kernels and a torch reference of each: paged decode and prefill attention, the KV
cache write, fused RMSNorm / RoPE / SiLU-and-mul, skinny matmuls, argmax, row scatter, and XXH3
page checksums.

A kernel file holds its Triton kernels and their launcher; `reference.py` holds the torch
references the tests compare them against (the checksum kernel is compared with `xxhash`). The
references need only torch (the CPU engine runs on them). The Triton
launchers are exported when Triton is installed; without a CUDA device they run in Triton's
interpreter (see `_common`). May import torch and triton only: nothing else in kvmesh, so
`workers/runner/`, `workers/models/` and `workers/offload/` can all use it.
"""

import importlib.util

from kvmesh.kernels.reference import (
    gather_kv,
    paged_decode_ref,
    paged_prefill_ref,
    rms_norm_ref,
    rotary_ref,
    silu_and_mul_ref,
    write_kv_ref,
)

__all__ = [
    "gather_kv",
    "paged_decode_ref",
    "paged_prefill_ref",
    "rms_norm_ref",
    "rotary_ref",
    "silu_and_mul_ref",
    "write_kv_ref",
]

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    # kernels._common must load first: it picks the interpreter before Triton is imported
    try:
        import kvmesh.kernels._common  # noqa: F401
    except RuntimeError as exc:  # Triton unusable here; the references still work
        import warnings

        warnings.warn(str(exc), stacklevel=2)
        HAS_TRITON = False
if HAS_TRITON:
    from kvmesh.kernels.argmax import argmax_rows
    from kvmesh.kernels.cache_write import write_kv
    from kvmesh.kernels.fused import rms_norm, silu_and_mul
    from kvmesh.kernels.paged_decode import (
        DecodeConfig,
        DecodeWorkspace,
        num_kv_splits,
        paged_decode,
    )
    from kvmesh.kernels.paged_prefill import paged_prefill
    from kvmesh.kernels.rotary import rotary

    __all__ += [
        "argmax_rows",
        "write_kv",
        "paged_decode",
        "paged_prefill",
        "DecodeWorkspace",
        "DecodeConfig",
        "num_kv_splits",
        "rms_norm",
        "rotary",
        "silu_and_mul",
    ]
