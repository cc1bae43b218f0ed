"""Issue 22, item 7 (tenant caches): a worker over real gRPC refuses an oversized tenant salt,
and many distinct salts keep its salted-namespace cache at its cap. Real SmolLM2 engine."""

from __future__ import annotations

import pytest
from engine_helpers import serve_loaded

from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.service.client import WorkerClient, WorkerError
from kvmesh.workers.service.wire import MAX_TENANT_SALT_CHARS

PROMPT = [504, 3458, 282, 4649, 314, 253, 1345]
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def served(smollm2):
    """(client, engine) of a real worker on a random port."""
    config = WorkerConfig(model="smollm2", device="cpu", max_model_len=256,
                          kv_cache_bytes=32 << 20, max_num_seqs=4)
    handle, engine = serve_loaded(config, smollm2)
    try:
        with WorkerClient(handle.address) as client:
            yield client, engine
    finally:
        handle.stop()


def _generate(client: WorkerClient, salt: str) -> list[int]:
    outputs = list(client.generate(PROMPT, ONE_TOKEN, tenant_salt=salt, timeout=60))
    return [t for out in outputs for t in out.token_ids]


def test_oversized_salt_is_invalid_argument_and_never_kept(served):
    client, engine = served
    num_before = len(engine.tenant_namespaces)
    with pytest.raises(WorkerError) as caught:
        _generate(client, "ab" * (1 << 19))  # 1 MiB
    assert caught.value.code == "INVALID_ARGUMENT"
    assert f"tenant_salt is longer than {MAX_TENANT_SALT_CHARS} characters" in caught.value.details
    with pytest.raises(WorkerError, match="INVALID_ARGUMENT"):
        _generate(client, "x" * (MAX_TENANT_SALT_CHARS + 1))
    assert len(engine.tenant_namespaces) == num_before
    assert len(_generate(client, "x" * MAX_TENANT_SALT_CHARS)) == 1  # at the limit: served
    assert len(engine.tenant_namespaces) == num_before + 1


def test_many_distinct_salts_keep_the_namespace_cache_at_its_cap(served):
    client, engine = served
    engine.tenant_namespaces.capacity = 8  # the default (1,024) would take minutes of requests
    for i in range(30):
        assert len(_generate(client, f"{i:032x}")) == 1
        assert len(engine.tenant_namespaces) <= 8
    assert len(engine.tenant_namespaces) == 8
    # the cache only saves work: a salt dropped from it still gets its own, same keys
    first, again = _generate(client, f"{0:032x}"), _generate(client, f"{0:032x}")
    assert first == again
