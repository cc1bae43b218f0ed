"""The engine: which requests run this step, which KV pages they use, and what they produced.

Owns the block manager (page pool, ref counts, prefix cache by page key, LRU eviction), the
scheduler (continuous batching, chunked prefill, preemption), sequences and their sampling
params, request outputs, KV events for the router, and detokenizing. These modules are plain
Python with no torch and no I/O, tested on CPU; they may import `kvmesh.cachestore.keys` and
`kvmesh.workers.errors`, and each other. `engine.py` builds one step from the runner
(`workers/runner/`), the offload (`workers/offload/`) and the model loader; it is the one module
here that imports them.
"""
