"""Paged-attention kernels (Triton) and their torch references.

The references import only torch, so the CPU engine never pays for importing Triton; the Triton
launchers are loaded on first access (``from kernels import paged_decode``).
"""

from kernels.reference import (
    gather_kv,
    paged_decode_ref,
    paged_prefill_ref,
    write_kv_ref,
)

_LAUNCHERS = {
    "paged_decode": "kernels.paged_decode",
    "DecodeWorkspace": "kernels.paged_decode",
    "num_kv_splits": "kernels.paged_decode",
    "paged_prefill": "kernels.paged_prefill",
    "write_kv": "kernels.cache_write",
}

__all__ = [
    "gather_kv",
    "paged_decode_ref",
    "paged_prefill_ref",
    "write_kv_ref",
    *_LAUNCHERS,
]


def __getattr__(name: str):
    if name in _LAUNCHERS:
        import importlib

        return getattr(importlib.import_module(_LAUNCHERS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
