"""TieredStore: tiers chained into one page store.

Owns: TierChain (chain.py: locate, put with cascading evictions, delete, the in-flight registry
of inflight.py and the per-tier error counters, once for every caller); TieredStore (tiered.py:
the namespace calls, which encode and verify pages); PageAccess (page_access.py: the key-level
calls the page RPCs serve); the validated tokens of one call (request.py).

May import: the bottom of cachestore (keys, codec, codec_batch, bulk_pool, errors) and tiers.
Never shm or rpc.
"""
