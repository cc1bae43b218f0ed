"""The worker: one model on one device, served over gRPC (`kvmesh worker`).

Subpackages, from the bottom up:

- `engine/`: the engine's bookkeeping (block manager, scheduler, sequences, sampling params,
  outputs, KV events, detokenizer), plain Python, and `engine.py`, which composes one step from
  the runner and the offload.
- `models/`: model definitions (Llama family) and the loader.
- `runner/`: everything that touches the device: the forward, the KV pool's page I/O, CUDA
  graphs, multi-step decode windows, sampling.
- `offload/`: moving KV pages between the GPU pool, the host tier and the store, behind the
  KV connector (`offload/connector.py`), the one interface the engine sees.
- `service/`: the `Worker` gRPC service around the engine, and its typed client.

At this root: `config.py` (`WorkerConfig`), `errors.py` (every typed worker error), `cli.py`
(`kvmesh worker`). Imports point down the list above (the runner and the offload use the
engine's plain data types, never the `Engine`); nothing here imports `kvmesh.router` or
`kvmesh.deploy`, and only `service/` serves gRPC.
"""
