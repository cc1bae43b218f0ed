"""Helpers shared by the engine tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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


_STORE_WRITER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from kvmesh.workers.config import WorkerConfig
    from kvmesh.workers.engine.engine import Engine
    from kvmesh.workers.engine.sampling_params import SamplingParams
    target, jobs, fields = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    results = []
    for job in jobs:
        engine = Engine(WorkerConfig(model=job["model"], store=target, **fields))
        out = engine.generate([job["prompt"]], SamplingParams(temperature=0.0, max_tokens=4,
                                                              ignore_eos=True))[0]
        engine.offload.flush()
        stored = [k.hex() for e in engine.pop_kv_events() if e.tier == "store" for k in e.keys]
        engine.close()
        results.append({"tokens": out, "stored": stored})
    print(json.dumps(results))
""")


def write_through_store(target: str, jobs: list[tuple[str, list[int]]], **fields) -> list[dict]:
    """Another worker process writes pages to the store at `target`: for each (model, prompt)
    job an engine (WorkerConfig(model, store=target, **fields)) generates 4 greedy tokens and
    flushes its store writes. Returns per job {"tokens": [...], "stored": [key hex, ...]}."""
    payload = json.dumps([{"model": model, "prompt": prompt} for model, prompt in jobs])
    proc = subprocess.run([sys.executable, "-P", "-c", _STORE_WRITER, target, payload,
                           json.dumps(fields)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
