"""A decode step through the few-row ops (skinny matmuls, split-K partials summed by their
consumers, RoPE fused into the cache write) against the same step through cuBLAS and the
separate kernels, on a tiny random Llama in bf16 and fp16. Run on the device (the fp32 engine
tests in test_engine_gpu.py also take this path, token for token against transformers)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

from kvmesh.kernels.fused import rms_norm, silu_and_mul
from kvmesh.kernels.rotary import rotary
from kvmesh.workers.models.llama import LlamaForCausalLM
from kvmesh.workers.models.ops import AttentionMetadata, FusedOps
from kvmesh.workers.runner.kernel_ops import attention_ops, few_row_ops

pytestmark = pytest.mark.gpu
PAGE_SIZE = 8


def decode_step(model, few, pool, batch):
    model.set_fused(FusedOps(rms_norm, rotary, silu_and_mul, few))
    ids, positions, meta = batch
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, meta, pool))


def tiny_decode(dev: torch.device, dtype: torch.dtype, num_seqs: int, seed: int):
    """(the tiny Llama on dev in dtype, a random pool, one decode step's batch over it: each
    sequence has 0-119 tokens in 16 random pages of the pool, plus the one it decodes)."""
    _, loaded = build()
    cfg = loaded.config
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions=256)
    model.load_weights(loaded.state_dict, dev, dtype)
    model.ops = attention_ops(dev, "triton")
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, 120, (num_seqs,), generator=gen)  # tokens already in the pool
    pages_per_seq = 16
    num_pages = num_seqs * pages_per_seq
    pool = torch.randn(num_pages + 1, cfg.num_layers, 2, PAGE_SIZE, cfg.num_kv_heads,
                       cfg.head_dim, generator=gen).to(dtype).to(dev)
    table = torch.randperm(num_pages, generator=gen).view(num_seqs, pages_per_seq)
    slots = table.gather(1, (ctx // PAGE_SIZE)[:, None])[:, 0] * PAGE_SIZE + ctx % PAGE_SIZE
    meta = AttentionMetadata(slots.to(dev), table.to(torch.int32).to(dev),
                             (ctx + 1).to(torch.int32).to(dev),
                             torch.arange(num_seqs + 1, dtype=torch.int32, device=dev), True)
    ids = torch.randint(0, cfg.vocab_size, (num_seqs,), generator=gen).to(dev)
    return model, pool, (ids, ctx.to(dev), meta), slots


def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA (run them on the device with -m gpu)")
    return torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_seqs", [1, 7, 64])
def test_few_row_decode_step_matches_the_cublas_step(dtype, num_seqs):
    dev = cuda_device()
    model, pool, batch, slots = tiny_decode(dev, dtype, num_seqs, seed=num_seqs)
    few = few_row_ops(dev)
    assert num_seqs <= few.max_rows
    plain_pool, few_pool = pool.clone(), pool.clone()
    expected = decode_step(model, None, plain_pool, batch)
    got = decode_step(model, few, few_pool, batch)
    scale = expected.abs().max().item()
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(got, expected, atol=tol * scale, rtol=0)
    # the new tokens' K/V land in the same slots, and nothing else moves
    changed = (few_pool != pool).flatten(1).any(1)
    assert set(changed.nonzero().flatten().tolist()) <= set((slots // PAGE_SIZE).tolist())
    kv_scale = plain_pool.abs().max().item()
    torch.testing.assert_close(few_pool.float(), plain_pool.float(), atol=tol * kv_scale, rtol=0)


def test_dependent_launch_changes_no_bit(monkeypatch):
    """The same bf16 decode step with programmatic dependent launch on and off: every kernel
    waits for the one before it, so nothing may differ."""
    import kvmesh.kernels._common as common

    dev = cuda_device()
    if torch.cuda.get_device_capability(dev)[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or newer")
    model, pool, batch, _ = tiny_decode(dev, torch.bfloat16, 9, seed=5)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("KVMESH_PDL", flag)
        common._pdl_on.cache_clear()
        assert common.use_pdl(dev) == (flag == "1" and common._version(torch.version.cuda)
                                       >= (12, 3))
        step_pool = pool.clone()
        results.append((decode_step(model, few_row_ops(dev), step_pool, batch), step_pool))
    common._pdl_on.cache_clear()
    (logits_on, pool_on), (logits_off, pool_off) = results
    assert torch.equal(logits_on, logits_off)
    assert torch.equal(pool_on, pool_off)
