"""Markdown tables of engine_bench results: `python benchmarks/engine_bench_tables.py FILE.json`."""

from __future__ import annotations

import json
import sys


def print_tables(results: dict) -> None:
    """Print the decode, TTFT and KV-waste tables of an engine_bench results dict."""
    for name, r in results.items():
        if not isinstance(r, dict) or "args" in r or name in ("args",):
            continue
        if "decode" in r:
            d = r["decode"]
            print(f"\n{name}: decode, 1K prompts, 256 new tokens (copy bandwidth "
                  f"{d['bandwidth_gb_s']:.0f} GB/s, weights {d['weight_gb']:.2f} GB, "
                  f"graphs {d['graphs']})\n")
            print("| batch | steps/round trip | engine tok/s | transformers tok/s | speedup "
                  "| step ms | GPU-only step ms | roofline ms | of roofline | engine TTFT s "
                  "| transformers TTFT s |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for x in d["rows"]:
                print(f"| {x['batch']} | {x.get('decode_steps', 1)} | {x['engine_tok_s']:.0f} | "
                      f"{x['hf_tok_s']:.0f} | "
                      f"{x['speedup']:.1f}x | {x['engine_step_ms']:.2f} | "
                      f"{x.get('graph_step_ms') or float('nan'):.2f} | "
                      f"{x['roofline_step_ms']:.2f} | {x['roofline_frac']:.0%} | "
                      f"{x['engine_ttft_s']:.3f} | {x['hf_ttft_s']:.3f} |")
        if "ttft" in r:
            print(f"\n{name}: TTFT of an 8K-token prefix + suffix (store: "
                  f"{r.get('ttft_store_path')})\n")
            print("| case | TTFT ms | of cold | cached tokens by tier |\n|---|---|---|---|")
            for case, x in r["ttft"].items():
                print(f"| {case} | {x['ttft_ms']:.1f} | {x['of_cold']:.0%} | {x['tiers']} |")
        if "memory" in r:
            m = r["memory"]
            print(f"\n{name}: KV waste, {m['requests']} requests, prompts {m['prompt_len']}, "
                  f"max_tokens {m['max_tokens']}: paged {m['paged_waste']:.2%}, contiguous "
                  f"max_model_len ({m['max_model_len']}) {m['contiguous_max_len_waste']:.1%}, "
                  f"contiguous prompt+max_tokens {m['contiguous_request_max_waste']:.1%}; at the "
                  f"peak step: KV {m['peak_kv_gb']:.2f} GB in {m['peak_paged_gb']:.2f} GB of pages"
                  f" (pool {m['pool_gb']:.1f} GB); contiguous max-length would reserve "
                  f"{m['peak_contiguous_max_len_gb']:.1f} GB; preemptions {m['preemptions']}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print_tables(json.load(f))
