"""The KVStore gRPC service, server side, and the wire forms both sides share.

Owns: the server (server.py: tiers from the config and the running server; servicer.py: the
thin RPC methods and their handler table; server_messages.py: request checks; streams.py:
bulk-stream limits), the data-plane control RPCs (dataplane_server.py: NIXL transfers of
cachestore/dataplane/ steered over gRPC), the lookup socket's server (lookup_server.py: Lookup
without gRPC's per-call cost, same tokens and scopes), the wire formats shared with the client
(wire.py, lookup_wire.py), the two error <-> status tables (status.py) and bearer-token auth
(auth.py: token scopes, and BearerAuth, the one interceptor that the worker's gRPC service uses
too).

May import: everything below it in cachestore (keys, codec, errors, config, tiers, store, shm,
dataplane); server.py imports the client only to give a RemoteTier its store.
"""
