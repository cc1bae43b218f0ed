"""KV offload: moving pages between the GPU pool, the host tier and the store.

`connector.py` is the KV connector, the one interface the engine sees; `host_offload.py`
implements it over the host tier and the store, its lookups and their staging in
`tier_lookup.py`. It demotes evicted pages to the host tier,
writes full pages through to the store in the background, and loads a stored prefix onto the
GPU, verifying its checksums before any token computed from it is kept. May import
`kvmesh.cachestore` (not its gRPC layer: the store client is handed in), `kvmesh.kernels.xxh3`,
the runner's copy helpers (`pool_copies`, `cuda_host`) and the engine's plain data types
(`kv_load`, `block_manager`, `outputs`); never the `Engine` or the service.
"""
