"""The KVStore gRPC service: the top layer of cachestore.

Owns: the server (server.py: tiers from the config and the running server; servicer.py: the
thin RPC methods and their handler table; server_messages.py: request checks; streams.py:
bulk-stream limits), the client (client.py, its key-level gets page_gets.py, its circuit breaker
breaker.py, KV tensors <-> pages kv_pages.py, its channel channel.py), the data-plane control
RPCs (dataplane_server.py on the server, dataplane_client.py in the client: NIXL transfers of
cachestore/dataplane/ steered over gRPC), the lookup socket (lookup_wire.py, lookup_server.py,
lookup_client.py: Lookup without gRPC's per-call cost, same tokens and scopes), the wire
format shared by both (wire.py), the two error <-> status tables (status.py) and bearer-token
auth (auth.py: token scopes, and BearerAuth, the one interceptor that the worker's gRPC service
uses too).

May import: everything below it in cachestore (keys, codec, errors, config, tiers, store, shm,
dataplane).
Nothing in cachestore imports rpc except the package root's lazy StoreClient and cli.py.
"""
