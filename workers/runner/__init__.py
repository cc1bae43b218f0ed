"""The model runner: owns the device and everything on it.

Runs the forward for a scheduled batch (Triton kernels and CUDA graphs on a GPU, the torch
references on a CPU), holds the KV pool tensor `[num_pages, num_layers, 2, page_size,
num_kv_heads, head_dim]` and its page I/O, queues multi-step decode windows, and samples. May
import torch, `kvmesh.kernels`, `workers/models/` and the engine's plain data types (sequences,
scheduled batches, outputs, sampling params); never the `Engine`, the offload or the service.
"""
