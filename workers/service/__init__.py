"""The `Worker` gRPC service around an engine, and its typed client.

`server.py` starts the gRPC server (ports, auth, health, reflection); `servicer.py` holds thin
handlers and the one typed-error to gRPC-status table; `engine_loop.py` is the one thread that
owns the `Engine`, reached from handler threads through queues (`streams.py`); `wire.py`
converts between protobuf messages and engine types; `client.py` is the `WorkerClient`, so
callers never see `pb2` objects. May import grpc, `kvmesh.v1`, `kvmesh.cachestore.rpc` (wire,
auth), `kvmesh.cachestore.keys` and `kvmesh.workers.engine`; nothing else in `workers` imports it.
"""
