"""Every family beside Llama (Qwen2 with and without tied embeddings, Qwen3, Mistral without a
window), and sliding windows shorter than the prompts (Mistral's of 24 and 7 on every layer,
Qwen2's of 6 and Qwen3's of 10 on their last two layers), each a tiny random model saved as a
Hugging Face folder and loaded through `load_model`: greedy output in fp32 on CPU
token-identical to transformers' generate cold, with the prefix from the device cache, from the
host tier, from the store written by another worker process, and under preemption; the windows
also over 16-token pages with prompts of 60+ tokens. (SmolLM2 runs the same cases for Llama in
test_engine_greedy and test_engine_store; test_engine_tiny runs every family through the Triton
kernels and checks that transformers' output changes with each window.)"""

from __future__ import annotations

import pytest
from engine_helpers import final, run, tokens_of, write_through_store
from tiny_models import (
    NEW_FAMILIES,
    PROMPTS,
    VOCAB,
    WINDOWS_OFF,
    family_of,
    hf_greedy,
    hf_model,
    save_folder,
)

from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.rpc.server import StoreServer
from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.engine import Engine
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.models.loader import hf_folder_for, load_model

N = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
PAGE = 8
PROMPT = PROMPTS[1]  # 37 tokens: four full pages and a partial one
FILLER = [(5 * i + 1) % VOCAB for i in range(52)]  # and N tokens: all 8 pages of 8


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> (transformers model, its folder, LoadedModel read back from the folder)."""
    tokenizer_folder = hf_folder_for("smollm2")[0]
    out = {}
    for family in NEW_FAMILIES:
        hf = hf_model(family)
        folder = save_folder(hf, tmp_path_factory.mktemp(family), tokenizer_folder)
        out[family] = (hf, folder, load_model(str(folder)))
    return out


def make(families, family: str, **fields) -> Engine:
    _, folder, loaded = families[family]
    config = {"page_size": PAGE, "kv_cache_bytes": 1 << 20, **fields}
    return Engine(WorkerConfig(model=str(folder), **config), loaded=loaded)


def page_nbytes(engine: Engine) -> int:
    return engine.namespace().page_nbytes


def assert_greedy_and_pages_freed(engine: Engine, hf, prompts: dict[str, list[int]]) -> None:
    """Every prompt's greedy output equals transformers', and every page is free after."""
    outs = run(engine, prompts, GREEDY)
    for rid, ids in prompts.items():
        assert tokens_of(outs[rid]) == hf_greedy(hf, ids, N), rid
    assert engine.stats().num_pages_free == engine.stats().num_pages_total


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_cold_batched_chunked_prefill_from_the_folder(families, family):
    hf, _, loaded = families[family]
    assert loaded.config.family == family_of(family)
    assert loaded.config.tie_word_embeddings == family.endswith("-tied")
    engine = make(families, family, max_num_batched_tokens=24)
    assert_greedy_and_pages_freed(engine, hf, {f"r{i}": p for i, p in enumerate(PROMPTS)})


@pytest.mark.parametrize("family", WINDOWS_OFF)
def test_windows_over_16_token_pages_with_prompts_of_60_and_more(families, family):
    """Prefill chunks of 24 tokens and decodes whose windows start mid-page, pages before
    every window not read."""
    hf, _, loaded = families[family]
    assert loaded.config.sliding_window is not None
    engine = make(families, family, page_size=16, max_num_batched_tokens=24)
    assert_greedy_and_pages_freed(
        engine, hf, {"a": PROMPTS[2], "b": [(13 * i + 5) % VOCAB for i in range(64)]})


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_prefix_from_the_device_cache(families, family):
    hf = families[family][0]
    engine = make(families, family)
    first_out = tokens_of(run(engine, {"a": PROMPT}, GREEDY)["a"])
    second = PROMPT + first_out + [11, 12, 13]
    outs = run(engine, {"b": second}, GREEDY)["b"]
    assert tokens_of(outs) == hf_greedy(hf, second, N)
    cached = PAGE * ((len(PROMPT) + N - 1) // PAGE)  # the last token of "a" was never fed back
    assert final(outs).usage.cached_tokens_by_tier == {"device": cached}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_prefix_from_the_host_tier_after_device_eviction(families, family):
    hf = families[family][0]
    probe = make(families, family)
    nbytes = page_nbytes(probe)
    probe.close()
    engine = make(families, family, kv_cache_bytes=8 * nbytes, host_tier_bytes=64 * nbytes)
    run(engine, {"a": PROMPT}, GREEDY)
    run(engine, {"filler": FILLER}, GREEDY)  # takes every device page: "a"'s are demoted
    second = PROMPT[:35] + [17, 18, 19, 20]
    outs = run(engine, {"b": second}, GREEDY)["b"]
    assert tokens_of(outs) == hf_greedy(hf, second, N)
    assert final(outs).usage.cached_tokens_by_tier == {"cpu": 32}
    assert engine.stats().prefix_hits["cpu"] == 4


@pytest.fixture(scope="module")
def store_with_prefixes(families):
    """A real store server whose pages of PROMPT, for every family, another worker process
    wrote through (one process, one engine a family)."""
    server = StoreServer(StoreConfig(port=0, cpu_bytes=64 << 20))
    try:
        jobs = [(str(families[family][1]), PROMPT) for family in NEW_FAMILIES]
        written = write_through_store(server.target, jobs, page_size=PAGE,
                                      kv_cache_bytes=1 << 20)
        yield server, dict(zip(NEW_FAMILIES, written, strict=True))
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_prefix_written_by_another_worker_process_from_the_store(families, family,
                                                                  store_with_prefixes):
    server, written = store_with_prefixes
    hf = families[family][0]
    engine = make(families, family, store=server.target)
    keys = engine.namespace().page_keys(PROMPT)
    # the writer computed PROMPT and 3 of its 4 tokens: five full pages, the first four PROMPT's
    assert [bytes.fromhex(k) for k in written[family]["stored"]][:4] == keys
    second = PROMPT[:35] + [21, 22, 23]
    outs = run(engine, {"b": second}, GREEDY)["b"]
    assert tokens_of(outs) == hf_greedy(hf, second, N)
    assert final(outs).usage.cached_tokens_by_tier == {"store": 32}
    engine.close()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_preemption_under_a_tiny_pool(families, family):
    """Three requests of 3 pages each at the end over a pool of 5 (16-token pages), in windows
    of 4 decode steps: preempted (demoted to the host tier) and resumed, output unchanged."""
    hf = families[family][0]
    probe = make(families, family, page_size=16)
    nbytes = page_nbytes(probe)
    probe.close()
    engine = make(families, family, page_size=16, kv_cache_bytes=5 * nbytes,
                  host_tier_bytes=32 * nbytes, decode_steps=4)
    prompts = {f"p{i}": [(11 * i + 3 * j + 1) % VOCAB for j in range(20)] for i in range(3)}
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = run(engine, prompts, params)
    assert engine.stats().num_preemptions > 0
    for rid, ids in prompts.items():
        assert tokens_of(outs[rid]) == hf_greedy(hf, ids, 24), rid
    assert engine.stats().num_pages_free == 5
