"""Engine fixtures: the real SmolLM2 weights loaded once per session, engines built on them,
greedy references from transformers' own `generate` on the same fp32 weights, and a store server."""

from __future__ import annotations

import pytest
import torch

# Two shared cores: one intra-op thread avoids OpenMP spin contention (10x slower otherwise).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    from kvmesh.workers.models.loader import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def make_engine(smollm2):
    """make_engine(**WorkerConfig fields) -> Engine sharing the session's weights."""
    from kvmesh.workers.config import WorkerConfig
    from kvmesh.workers.engine.engine import Engine

    engines = []

    def make(**overrides):
        fields = {"max_model_len": 512, "kv_cache_bytes": 64 << 20}
        fields.update(overrides)
        engine = Engine(WorkerConfig(**fields), loaded=smollm2)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="session")
def hf_greedy(smollm2):
    """hf_greedy(prompt_ids, max_new_tokens) -> new token ids from transformers generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32).eval()
    cache: dict[tuple, list[int]] = {}

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in cache:
            ids = torch.tensor([prompt_ids])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
            cache[key] = out[0, len(prompt_ids) :].tolist()
        return cache[key]

    return greedy


@pytest.fixture(scope="session")
def encode(smollm2):
    def encode(text: str) -> list[int]:
        return smollm2.tokenizer(text)["input_ids"]

    return encode


@pytest.fixture
def store_server():
    """A real store server (gRPC on a free loopback port, 256 MB CPU tier), in this process."""
    from kvmesh.cachestore.config import StoreConfig
    from kvmesh.cachestore.rpc.server import StoreServer

    server = StoreServer(StoreConfig(port=0, cpu_bytes=256 << 20))
    yield server
    server.stop(grace=0)
