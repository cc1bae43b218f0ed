"""Helpers shared by the engine tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from kvmesh.workers.engine.outputs import RequestOutput
from kvmesh.workers.engine.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a land far away, there lived a small dragon who loved to read books "
    "about the stars and the sea.",
]
LONG = ("In 1440 Johannes Gutenberg built a printing press with movable metal type in Mainz. "
        "Within fifty years presses were running in more than two hundred cities, and")


def run(engine, prompts: dict[str, list[int]], params: SamplingParams
        ) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in prompts}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


def tokens_of(outs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for o in outs if o.index == index for t in o.new_token_ids]


def final(outs: list[RequestOutput], index: int = 0) -> RequestOutput:
    (last,) = [o for o in outs if o.index == index and o.finish_reason is not None]
    return last


def serve_loaded(config, loaded):
    """A real worker on a random loopback port whose engine shares the session's loaded weights:
    (handle, engine). The caller stops the handle."""
    from kvmesh.workers.engine.engine import Engine
    from kvmesh.workers.service.server import serve_worker

    engines: list[Engine] = []

    def factory() -> Engine:
        engines.append(Engine(config, loaded=loaded))
        return engines[-1]

    handle = serve_worker(config, "127.0.0.1", 0, load_timeout=300, engine_factory=factory)
    return handle, engines[0]
