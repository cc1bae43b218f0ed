"""StoreClient, the typed Python client of a KVStore server (callers never see pb2 objects).

Owns: store_client.py (`StoreClient`: tensor put / get_closest, key-level pages, lookup, stats),
page_gets.py (its key-level gets: inline frames, same-host shared memory, mapped arenas),
dataplane.py (its side of the NIXL data plane: leases READ and reservations WRITTEN through
cachestore/dataplane/, with gRPC frames as the fallback), lookup.py (the lookup socket, sync and
asyncio), kv_pages.py (KV tensors <-> page payloads), breaker.py (the circuit breaker) and
channel.py (the gRPC channel and its options).

May import: everything below it in cachestore, and the wire forms and status table of
cachestore/rpc (wire.py, lookup_wire.py, status.py); never the server side of rpc.
"""
