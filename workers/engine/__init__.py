"""The engine: which requests run this step, which KV pages they use, and what they produced.

Owns the block manager (page pool, ref counts, prefix cache by page key, LRU eviction), the
scheduler (continuous batching, chunked prefill, preemption, decode windows), the state machine
of a prefix load (`kv_load.py`, with the connector's scheduler side), sequences and their
sampling params, request outputs, KV events for the router, and detokenizing. These modules are
plain Python with no I/O, tested on CPU; they may import `kvmesh.cachestore.keys` and
`kvmesh.workers.errors`, and each other. `engine.py` runs a step as schedule -> execute ->
postprocess over the runner (`workers/runner/`) and the KV connector (`workers/offload/`), and
builds them and the model; it is the one module here that imports them.
"""
