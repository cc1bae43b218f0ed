"""Where a request goes: routing policy, prefix index, worker pool, store probe.

`policy.py` (estimated cost per worker, load balancing) and `index.py` (which worker holds which
page key, in which tier) are pure Python: no I/O, no threads. `pool.py`
owns the gRPC channels to the workers (health, circuit breakers, the KvEvents streams that feed
the index); `store_probe.py` asks the shared store how much of a prompt it holds. May import
grpc, `kvmesh.v1`, `kvmesh.cachestore.keys`, `kvmesh.cachestore.rpc.wire`, `router.config`,
`router.errors` and `router.metrics`; never `router.http` or `router.service`.
"""
