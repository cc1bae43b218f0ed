"""Model definitions and the loader: weights in, a torch module out.

One definition per family (Llama today) and `loader.py`, which reads a Hugging Face folder or
a GGUF file through transformers and refuses an unsupported architecture with a clear error.
May import torch, transformers, `kvmesh.kernels` and `kvmesh.workers.errors`; knows nothing of
pages, scheduling or the store.
"""
