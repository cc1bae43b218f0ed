"""The store's bulk data plane: page bytes moved by NIXL (UCX: TCP, shared memory, RDMA where
present) one-sided READs and WRITEs straight out of / into the cpu tier's registered slot arenas,
while gRPC (cachestore/rpc/) stays the control path: hello, lease, reserve, commit, release.

Owns: the NIXL agents (agent.py: one per store server with a progress thread that sleeps when
idle; one per client, polled by its caller), the store side's leases and reservations of slots
(store_side.py), the client side's registered buffers and transfers (initiator.py).

May import the bottom modules (codec, errors, keys, shm.segments), tiers/ and store/; never rpc/
(which steers this package) or the rest of shm/ (the /dev/shm planes, its peer). Without nixl
installed, agent.nixl_api() is None and the gRPC frames carry the bytes.
"""
