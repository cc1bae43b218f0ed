"""Page keys: the one chained-key implementation (cachestore.keys)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from kvmesh.cachestore.keys import (
    InvalidNamespace,
    Namespace,
    SaltedNamespaces,
    chain_keys,
    tokens_to_bytes,
)

BASE = Namespace("HuggingFaceTB/SmolLM2-135M-Instruct", num_layers=30, num_kv_heads=3,
                 head_dim=64, dtype="bfloat16", page_size=16, weights_fingerprint="w1",
                 tokenizer_fingerprint="t1")
TOKENS = list(range(1000, 1000 + 16 * 6 + 5))  # 6 full pages and a partial one

# One changed value per identity field; each must change every key.
VARIANTS = {
    "model": "other-model",
    "num_layers": 31,
    "num_kv_heads": 1,
    "head_dim": 128,
    "dtype": "float16",
    "page_size": 8,
    "salt": "tenant-a",
    "weights_fingerprint": "w2",
    "tokenizer_fingerprint": "t2",
    "lora_id": "adapter-1",
    "tp_rank": 1,
    "tp_size": 2,
    "layout_version": 2,
}


def test_key_definition_exact():
    keys = BASE.page_keys(TOKENS)
    data = np.asarray(TOKENS, dtype="<i4").tobytes()
    expected, prev = [], BASE.digest
    for i in range(6):
        prev = xxhash.xxh3_128_digest(prev + data[64 * i : 64 * (i + 1)], seed=0)
        expected.append(prev)
    assert keys == expected
    assert all(len(k) == 16 for k in keys)


def test_keys_identical_across_processes():
    code = (
        "import json; from kvmesh.cachestore.keys import Namespace; "
        "ns = Namespace('HuggingFaceTB/SmolLM2-135M-Instruct', num_layers=30, num_kv_heads=3, "
        "head_dim=64, dtype='bfloat16', page_size=16, weights_fingerprint='w1', "
        "tokenizer_fingerprint='t1'); "
        f"print(json.dumps([k.hex() for k in ns.page_keys({TOKENS!r})]))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout) == [k.hex() for k in BASE.page_keys(TOKENS)]


def test_torch_dtype_and_name_give_the_same_keys():
    torch = pytest.importorskip("torch")
    assert dataclasses.replace(BASE, dtype=torch.bfloat16).page_keys(TOKENS) == BASE.page_keys(
        TOKENS)


@pytest.mark.parametrize("field", sorted(VARIANTS))
def test_any_identity_field_change_changes_every_key(field):
    base = BASE
    if field == "tp_rank":  # rank 1 needs two shards; compare with rank 0 of the same two
        base = dataclasses.replace(BASE, tp_size=2)
    variant = dataclasses.replace(base, **{field: VARIANTS[field]})
    assert variant.digest != base.digest
    base_keys = set(base.page_keys(TOKENS))
    variant_keys = variant.page_keys(TOKENS)
    assert variant_keys and base_keys.isdisjoint(variant_keys)


def test_salt_separates_tenants():
    a, b = BASE.with_salt("tenant-a"), BASE.with_salt("tenant-b")
    assert a.salt == "tenant-a" and a.model == BASE.model
    assert set(a.page_keys(TOKENS)).isdisjoint(b.page_keys(TOKENS))
    assert a.with_salt("").page_keys(TOKENS) == BASE.page_keys(TOKENS)


def test_partial_page_has_no_key_and_prefixes_share_keys():
    keys = BASE.page_keys(TOKENS)
    assert len(keys) == 6
    assert BASE.page_keys(TOKENS[:15]) == []
    assert BASE.page_keys(TOKENS[:16 * 3 + 15]) == keys[:3]
    assert BASE.page_keys(TOKENS[:16 * 3]) == keys[:3]


def test_chain_each_key_depends_on_every_earlier_page():
    changed = list(TOKENS)
    changed[3] += 1  # inside page 0
    assert set(BASE.page_keys(changed)).isdisjoint(BASE.page_keys(TOKENS))
    changed = list(TOKENS)
    changed[16 * 4] += 1  # first token of page 4
    assert BASE.page_keys(changed)[:4] == BASE.page_keys(TOKENS)[:4]
    assert set(BASE.page_keys(changed)[4:]).isdisjoint(BASE.page_keys(TOKENS))


def test_chain_keys_resumes_from_a_parent():
    keys = BASE.page_keys(TOKENS)
    data = tokens_to_bytes(TOKENS)
    assert chain_keys(keys[1], data, 16, start_page=2) == keys[2:]


def test_invalid_namespace():
    with pytest.raises(InvalidNamespace, match="page_size"):
        dataclasses.replace(BASE, page_size=0)
    with pytest.raises(InvalidNamespace, match="tp_rank"):
        dataclasses.replace(BASE, tp_rank=2, tp_size=2)
    with pytest.raises(InvalidNamespace, match="dtype"):
        dataclasses.replace(BASE, dtype="int8")
    with pytest.raises(InvalidNamespace, match="model"):
        dataclasses.replace(BASE, model="")


def test_salted_namespaces_are_built_once_and_bounded_least_recently_used_first():
    cache = SaltedNamespaces(capacity=2)
    a = cache.get(BASE, "a")
    assert a == BASE.with_salt("a") and cache.get(BASE, "a") is a
    assert cache.get(BASE, "") is BASE and len(cache) == 1  # the base is never stored
    b = cache.get(BASE, "b")
    assert cache.get(BASE, "a") is a  # a is now the most recent
    c = cache.get(BASE, "c")  # over capacity: b, the least recent, goes
    assert len(cache) == 2
    assert cache.get(BASE, "a") is a and cache.get(BASE, "c") is c
    rebuilt = cache.get(BASE, "b")
    assert rebuilt is not b and rebuilt == b and rebuilt.digest == b.digest
    other = dataclasses.replace(BASE, model="other-model")
    assert cache.get(other, "a").digest != a.digest  # keyed by base and salt
    with pytest.raises(ValueError):
        SaltedNamespaces(capacity=0)
