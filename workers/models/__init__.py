"""Model definitions and the loader: weights in, a torch module out.

Shared layers (`layers.py`: RMSNorm, paged attention, SwiGLU MLP, decoder layer; `rotary.py`;
`causal_lm.py`, the forward) and one small definition per family (`llama.py`, `mistral.py`,
`qwen2.py`, `qwen3.py`); `registry.py` maps transformers' architectures to them and refuses the
rest; `loader.py` reads a Hugging Face folder or a GGUF file through transformers. May import
torch, transformers, `kvmesh.kernels` and `kvmesh.workers.errors`; knows nothing of pages,
scheduling or the store.
"""
