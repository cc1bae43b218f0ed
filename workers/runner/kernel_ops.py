"""Which kernels the model runs with: the torch reference ops or the Triton kernels, and the
skinny matmuls for few-row forwards."""

from __future__ import annotations

import torch

from kvmesh.kernels import reference
from kvmesh.workers.models.ops import AttentionOps, FewRowOps


def attention_ops(device: torch.device, backend: str = "auto") -> AttentionOps:
    """torch reference ops (CPU default) or the Triton kernels (CUDA default; on CPU they run
    under TRITON_INTERPRET=1)."""
    if backend == "torch" or (backend == "auto" and device.type == "cpu"):
        return AttentionOps(reference.write_kv_ref, reference.paged_prefill_ref,
                            reference.paged_decode_ref)
    from kvmesh.kernels.cache_write import write_kv
    from kvmesh.kernels.paged_decode import paged_decode
    from kvmesh.kernels.paged_prefill import paged_prefill

    return AttentionOps(write_kv, paged_prefill, paged_decode)


def few_row_ops(device: torch.device) -> FewRowOps:
    """Skinny matmuls for forwards of up to 64 tokens (decode steps, short chunks). In fp32 they
    multiply exactly ("ieee" dots, slower than cuBLAS' fp32 but an fp32 model is for testing);
    on CPU they run under Triton's interpreter."""
    from kvmesh.kernels.cache_write import rope_write_kv
    from kvmesh.kernels.skinny_gemm import SkinnyLinears

    linears = SkinnyLinears(8)  # CPU: the interpreter; any small grid will do
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        linears = SkinnyLinears(props.multi_processor_count,
                                shared_memory=props.shared_memory_per_block_optin)
    return FewRowOps(linears.max_rows, linears.linear, linears.linear_partials, linears.gated,
                     rope_write_kv)
