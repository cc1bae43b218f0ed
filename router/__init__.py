"""The router: an OpenAI-compatible HTTP server that sends each request to the worker that
will serve it cheapest (`kvmesh router`).

- `http/`: the aiohttp front: parse OpenAI requests, write responses and SSE streams.
- `service.py`: `Router`, one request end to end: tokenize, compute page keys, choose a worker,
  call it, retry or migrate on failure.
- `routing/`: the routing policy and the prefix index (pure), the worker pool (gRPC channels,
  health, KvEvents feeding the index) and the store probe.

At this root: `config.py` (`RouterConfig`), `requests.py` (a checked request, the one type the
front hands the core), `errors.py` (every typed router error and the one
HTTP status table), `metrics.py`, `tokenizer.py`, `cli.py`, `processes.py` (`--processes N`:
N serving processes on one port under a supervising parent). May import `kvmesh.cachestore.keys`,
`kvmesh.cachestore.rpc` (wire, auth) and `kvmesh.v1`; never `kvmesh.workers` (it talks to
workers over gRPC only).
"""
