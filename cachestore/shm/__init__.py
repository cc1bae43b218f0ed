"""Same-host shared memory: GetPages answered through /dev/shm instead of a gRPC stream.

Owns: segment files and parallel copies (segments.py, a leaf that the CPU tier uses too), the
mappings of them (maps.py), the server side (server.py: writing pages into a client's segment;
leases.py: mapped reads of the CPU tier's arenas) and the client side (client.py: the segment
pool; page_lease.py: what a key-level get hands back).

May import: the bottom of cachestore (keys, codec, bulk_pool, errors), tiers and store. Never
rpc: the gRPC calls are passed in (client.py's `fetch`), so shared memory knows nothing of the
wire.
"""
