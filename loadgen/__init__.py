"""Load generators. `serve.py` is `kvmesh bench serve`: it drives a running OpenAI-compatible
server over HTTP and reports latency percentiles and the prefix-cache hit rate.

Not part of serving: nothing in cachestore, workers, router or deploy imports it. It may import
the router's tokenizer and the worker client (for its direct-to-worker peer run).
"""
