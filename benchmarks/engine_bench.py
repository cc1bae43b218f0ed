"""Engine benchmark on random bf16 weights with Llama-3.2-1B / Llama-3-8B shapes (or any shape
of benchmarks/model_folders.py: Qwen2.5-7B, Qwen3-8B), beside
transformers' `generate` on the very same weight tensors, in one run.

  decode   tokens/s at batch 1/32/64 (1K-token prompts, 256 new tokens), engine vs transformers,
           and the engine's decode step against the roofline (weight + KV bytes / copy bandwidth)
  ttft     first token of an 8K-token prompt: cold, device prefix hit, host-tier hit, and a hit
           from a KVStore gRPC server on loopback (shared memory; an in-process TieredStore
           behind the same page API when the generated gRPC code is missing); with
           `--checksums device,cpu` the host and store hits are measured once per side that
           verifies the loaded pages (the GPU after the copy, the default on CUDA; or the CPU)
  memory   KV bytes used vs allocated under a mixed-length workload, next to a contiguous
           max-length allocation of the same requests

  python benchmarks/engine_bench.py --models 1b,8b --out DIR
  python benchmarks/engine_bench.py --models 8b,qwen2.5-7b,qwen3-8b --parts decode --batches 32
  python benchmarks/engine_bench.py --device cpu --models tiny --smoke   # CPU check

Importable without kvmesh.v1 / grpc.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from engine_bench_tables import print_tables
from model_folders import build_model

from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.engine.engine import Engine
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.models.loader import LoadedModel
from kvmesh.workers.models.registry import config_from_hf

# short names of model_folders.SHAPES (any of its names works too)
ALIASES = {"1b": "llama-1b", "8b": "llama-8b", "tiny": "llama-tiny"}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(name: str, device: str, dtype: torch.dtype, max_len: int):
    hf = build_model(ALIASES.get(name, name), device, dtype, max_len)
    loaded = LoadedModel(f"random-{name}", config_from_hf(hf.config), hf.state_dict(),
                         None, f"random-{name}-seed0", "none", Path("."))
    return hf, loaded


def prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (num, length), generator=g).tolist()


def engine_run(engine: Engine, batch: list[list[int]], new_tokens: int):
    """(ttft of the whole batch, decode seconds after it, outputs) for one batch."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(f"b{start}-{i}", p, params)
    outs: dict[str, list[int]] = {}
    first_all = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        if first_all is None and len(outs) == len(batch):
            first_all = time.perf_counter()
    end = time.perf_counter()
    return first_all - start, end - first_all, [outs[k] for k in sorted(outs, key=lambda k:
                                                                       int(k.split("-")[-1]))]


@torch.inference_mode()
def hf_run(hf, batch: list[list[int]], new_tokens: int, device: str):
    ids = torch.tensor(batch, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=1)
    sync(device)
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(device)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(device)
    return ttft, time.perf_counter() - t0 - ttft, out[:, ids.shape[1]:].tolist()


def graph_step_ms(engine: Engine, batch: int, repeats: int = 50) -> float | None:
    """GPU time of one decode step alone: back-to-back replays of the captured graph for
    `batch`, inputs frozen at the last step of the previous run (the longest context), no host
    work between replays. None without graphs."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.fits(batch):
        return None
    size = next(s for s in graphs.sizes if s >= batch)
    graphs.step.zero_()  # replays recompute the same step instead of advancing
    graph = graphs.graphs[size]
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / repeats


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if not device.startswith("cuda"):
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * 10 * x.numel() / (time.perf_counter() - t0)


def bench_decode(name, hf, loaded, args, out: dict) -> None:
    cfg = loaded.config
    kv_token_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    # bytes a decode step reads: every matrix once (a tied embedding is the LM head); an untied
    # embedding table is only gathered, so it is left out
    read = {t.data_ptr(): t.numel() * t.element_size() for k, t in loaded.state_dict.items()
            if k != "model.embed_tokens.weight" or cfg.tie_word_embeddings}
    weight_bytes = sum(read.values())
    engine = Engine(WorkerConfig(model=name, device=args.device, dtype=args.dtype,
                                 kv_cache_bytes=args.kv_gib << 30, max_num_seqs=max(args.batches),
                                 max_num_batched_tokens=16384, max_model_len=args.max_len),
                    loaded=loaded)
    engine_run(engine, prompts(2, 64, cfg.vocab_size, 99), 4)  # compile prefill kernels
    bandwidth = copy_bandwidth(args.device)
    rows = []
    for bs in args.batches:
        batch = prompts(bs, args.prompt_len, cfg.vocab_size, seed=bs)
        h_ttft, h_dec, h_out = hf_run(hf, batch, args.new_tokens, args.device)
        for decode_steps in args.decode_steps:
            engine.decode_steps = decode_steps  # steps queued at once (multi-step decode)
            e_ttft, e_dec, e_out = engine_run(engine, batch, args.new_tokens)
            steps = args.new_tokens - 1
            avg_ctx = args.prompt_len + args.new_tokens / 2
            roof_s = (weight_bytes + bs * avg_ctx * kv_token_bytes) / bandwidth
            agree = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b),
                          len(x)) for x, y in zip(e_out, h_out, strict=True)]
            rows.append(dict(batch=bs, decode_steps=decode_steps,
                             engine_tok_s=bs * steps / e_dec, hf_tok_s=bs * steps / h_dec,
                             speedup=h_dec / e_dec, engine_step_ms=1e3 * e_dec / steps,
                             roofline_step_ms=1e3 * roof_s, roofline_frac=roof_s / (e_dec / steps),
                             engine_ttft_s=e_ttft, hf_ttft_s=h_ttft,
                             graph_step_ms=graph_step_ms(engine, bs),
                             greedy_agree_min=min(agree),
                             greedy_agree_mean=sum(agree) / len(agree)))
            print(f"[{name}] decode bs={bs}: {rows[-1]}", flush=True)
    out["decode"] = dict(bandwidth_gb_s=bandwidth / 1e9, weight_gb=weight_bytes / 1e9,
                         graphs=engine.runner.graphs is not None, rows=rows)
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None


def first_token_s(engine: Engine, prompt: list[int]) -> tuple[float, dict]:
    """Seconds to the first token of `prompt`, and its cached tokens by tier. Starts from a
    settled worker: the device idle, and the store segments that earlier writes made already
    page-locked (done once per segment, in the background; a driver call that pins hundreds of
    MB holds up this process's other CUDA calls meanwhile)."""
    if engine.offload.pinned is not None:
        engine.offload.pinned.wait_idle(30.0)
    sync(engine.config.device)
    t0 = time.perf_counter()
    engine.add_request(f"t{t0}", prompt, SamplingParams(temperature=0.0, max_tokens=1))
    usage = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            usage = o.usage or usage
    return time.perf_counter() - t0, usage.cached_tokens_by_tier


def evict_all(engine: Engine) -> None:
    """Take every free page once: cached pages are evicted (and demoted to the host tier)."""
    bm = engine.block_manager
    bm.release(bm.allocate(bm.num_free_pages))


def attach_store(engine: Engine, nbytes: int) -> tuple[str, object]:
    """A real KVStore gRPC server on loopback when the generated gRPC code imports (carry the
    git-ignored kvmesh/ folder); else a TieredStore behind the same key-level page API.
    Returns (which one, the server or None)."""
    from kvmesh.cachestore.config import StoreConfig

    try:
        from kvmesh.cachestore.client.store_client import StoreClient
        from kvmesh.cachestore.rpc.server import StoreServer

        server = StoreServer(StoreConfig(port=0, cpu_bytes=nbytes))
        engine.attach_store(StoreClient(server.target, timeout=60.0,
                                        **engine.offload.segment_hooks()))
        return "grpc-loopback", server
    except Exception as exc:  # no kvmesh.v1 / grpc extras on this machine
        print(f"store over gRPC unavailable ({exc!r}); using the in-process page API", flush=True)
    from kvmesh.cachestore.codec import encode_page
    from kvmesh.cachestore.shm.page_lease import PageLease  # (needs no generated gRPC code)
    from kvmesh.cachestore.store.page_access import PageAccess
    from kvmesh.cachestore.store.tiered import TieredStore
    from kvmesh.cachestore.tiers.cpu import CpuTier

    store = TieredStore([CpuTier(nbytes)])
    access = PageAccess(store)

    class InProcessStore:  # StoreClient's key-level page API, minus the network
        close = store.close

        def get_pages_leased(self, keys, prefix_only=False, mapped=False):
            return PageLease(access.get(keys, prefix_only=prefix_only))  # inline pages

        def put_encoded_pages(self, pages):
            return access.put(pages)

        def put_pages_from(self, namespace, pages):
            return access.put([(key, encode_page(namespace, key, token_ids, payload))
                               for key, token_ids, payload in pages])

    engine.attach_store(InProcessStore())
    return "in-process", None


def bench_ttft(name, loaded, args, out: dict) -> None:
    cfg = loaded.config
    kv = WorkerConfig(model=name, device=args.device, dtype=args.dtype,
                      kv_cache_bytes=args.kv_gib << 30, max_num_seqs=8,
                      max_num_batched_tokens=16384, max_model_len=args.max_len,
                      host_tier_bytes=args.host_gib << 30)
    engine = Engine(kv, loaded=loaded)
    store_path, server = attach_store(engine, args.host_gib << 30)
    first_token_s(engine, prompts(1, 256, cfg.vocab_size, 7)[0])  # compile
    gc.collect()
    gc.freeze()  # as `kvmesh worker` does once serving (unfrozen before this engine goes)
    results = {}
    try:
        for trial in range(args.trials):
            base = prompts(1, args.ttft_prefix, cfg.vocab_size, seed=1000 + trial)[0]
            suffix = prompts(1, 16, cfg.vocab_size, seed=2000 + trial)[0]
            measured = {}
            measured["cold"] = first_token_s(engine, base + suffix)
            engine.offload.flush()
            measured["device_hit"] = first_token_s(engine, base + suffix[:8])
            for where in args.checksums.split(","):
                # which side verifies the loaded pages' checksums: the GPU after the copy (the
                # default on CUDA) or the CPU pool in host memory
                engine.offload.stager.device_checksums = where == "device" and args.device != "cpu"
                label = "" if where == args.checksums.split(",")[0] else f"_{where}_checksums"
                evict_all(engine)  # demotes the pages to the host tier
                measured[f"host_hit{label}"] = first_token_s(engine, base + suffix[:4])
                evict_all(engine)
                engine.offload.host.delete_many(engine.namespace().page_keys(base + suffix))
                measured[f"store_hit{label}"] = first_token_s(engine, base + suffix[:2])
            for key, (secs, tiers) in measured.items():
                results.setdefault(key, []).append((secs, tiers))
            times = ", ".join(f"{k} {1e3 * s:.1f} ms" for k, (s, _) in measured.items())
            print(f"[{name}] ttft trial {trial}: {times}", flush=True)
    finally:
        gc.unfreeze()
    summary = {k: dict(ttft_ms=1e3 * min(s for s, _ in v), tiers=v[-1][1])
               for k, v in results.items()}
    cold = summary["cold"]["ttft_ms"]
    for v in summary.values():
        v["of_cold"] = v["ttft_ms"] / cold
    print(f"[{name}] ttft {args.ttft_prefix} tokens: {summary}", flush=True)
    out["ttft"] = summary
    out["ttft_store_path"] = store_path
    engine.close()
    if server is not None:
        server.stop(grace=0)
    del engine
    gc.collect()
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None


def bench_memory(name, loaded, args, out: dict) -> None:
    cfg = loaded.config
    engine = Engine(WorkerConfig(model=name, device=args.device, dtype=args.dtype,
                                 kv_cache_bytes=args.mem_kv_gib << 30, max_num_seqs=64,
                                 max_num_batched_tokens=16384, max_model_len=args.max_len,
                                 enforce_eager=not args.device.startswith("cuda")),
                    loaded=loaded)
    g = torch.Generator().manual_seed(5)
    n = args.mem_requests
    lens = torch.randint(args.mem_min, args.mem_max, (n,), generator=g).tolist()
    new = torch.randint(16, args.mem_new_max, (n,), generator=g).tolist()
    for i in range(n):
        p = prompts(1, lens[i], cfg.vocab_size, seed=3000 + i)[0]
        engine.add_request(f"m{i}", p, SamplingParams(temperature=0.0, max_tokens=new[i],
                                                      ignore_eos=True))
    ps, bm = engine.page_size, engine.block_manager
    samples = []
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        if not running:
            continue
        tokens = sum(s.num_computed_tokens for s in running)
        used_pages = bm.num_pages - bm.num_free_pages
        samples.append((tokens, used_pages * ps, len(running) * args.max_len,
                        sum(s.num_prompt_tokens + s.sampling.max_tokens for s in running)))
    t = sum(s[0] for s in samples)
    out["memory"] = dict(
        requests=n, prompt_len=[args.mem_min, args.mem_max], max_tokens=[16, args.mem_new_max],
        page_size=ps, paged_waste=1 - t / sum(s[1] for s in samples),
        contiguous_max_len_waste=1 - t / sum(s[2] for s in samples),
        contiguous_request_max_waste=1 - t / sum(s[3] for s in samples),
        max_model_len=args.max_len, steps=len(samples))
    token_gb = engine.runner.page_nbytes / ps / 1e9
    peak = max(samples, key=lambda x: x[1])  # the step holding the most pages
    out["memory"].update(pool_gb=engine.runner.num_pages * ps * token_gb,
                         peak_kv_gb=peak[0] * token_gb, peak_paged_gb=peak[1] * token_gb,
                         peak_contiguous_max_len_gb=peak[2] * token_gb,
                         preemptions=engine.stats().num_preemptions)
    print(f"[{name}] memory: {out['memory']}", flush=True)
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("models", "1b,8b"), ("device", "cuda"), ("batches", "1,32,64"),
                          ("decode-steps", "8"),
                          ("parts", "decode,ttft,memory"), ("out", None),
                          ("checksums", "device")):
        ap.add_argument(f"--{flag}", default=default)
    for flag, default in (("prompt-len", 1024), ("new-tokens", 256), ("ttft-prefix", 8192),
                          ("trials", 2), ("kv-gib", 16), ("mem-kv-gib", 40), ("host-gib", 4),
                          ("max-len", 8704),
                          ("mem-requests", 64), ("mem-min", 64), ("mem-max", 4096),
                          ("mem-new-max", 512)):
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.decode_steps = [int(k) for k in args.decode_steps.split(",")]
    if args.smoke:
        args.batches, args.prompt_len, args.new_tokens, args.ttft_prefix = [1, 4], 64, 8, 256
        args.kv_gib, args.mem_kv_gib, args.host_gib, args.max_len, args.trials = 1, 1, 1, 512, 1
        args.mem_requests, args.mem_min, args.mem_max, args.mem_new_max = 8, 16, 200, 32
    args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    torch_dtype = getattr(torch, args.dtype)
    results: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                     else "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "args": {k: v for k, v in vars(args).items()}}
    for name in args.models.split(","):
        hf, loaded = build(name, args.device, torch_dtype, args.max_len)
        out = results.setdefault(name, {})
        parts = args.parts.split(",")
        for part in (p for p in ("decode", "ttft", "memory") if p in parts):
            if part == "decode":
                bench_decode(name, hf, loaded, args, out)
            elif part == "ttft":
                bench_ttft(name, loaded, args, out)
            else:
                bench_memory(name, loaded, args, out)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                Path(args.out, "engine_bench.json").write_text(json.dumps(results, indent=1))
        del hf, loaded
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(json.dumps(results, indent=1))
    print_tables(results)


if __name__ == "__main__":
    main()
