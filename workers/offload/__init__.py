"""KV offload: moving pages between the GPU pool, the host tier and the store.

Demotes evicted pages to the host tier, writes full pages through to the store in the
background, and loads a stored prefix onto the GPU, verifying its checksums before any token
computed from it is kept. May import `kvmesh.cachestore` (keys, codec, tiers, shared memory),
`kvmesh.kernels.xxh3`, the runner's page I/O (`pool_copies`, `cuda_host`) and the engine's plain
data types; never the `Engine` or the service.
"""
