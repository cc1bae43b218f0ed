"""Next-token choice from logits: greedy, temperature, top-k, top-p, per-request seed."""

from __future__ import annotations

import torch

from kvmesh.workers.engine.sampling_params import SamplingParams


def make_generator(params: SamplingParams, index: int, device: str = "cpu") -> torch.Generator:
    """A generator for completion `index` of a request: seeded from params.seed (+ index, so
    the n completions differ but each is reproducible) or from the OS when seed is None."""
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed((params.seed + index) % 2**63)
    return gen


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits of one row with tokens outside top-k / top-p set to -inf.
    logits: [vocab] fp32 -> [vocab] fp32 (new tensor)."""
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


class SamplingError(ValueError):
    """A row's distribution is unusable (NaN, inf or no mass left): only its request fails."""


def sample_each(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int | Exception]:
    """One token per row, or the exception that row raised: a failing row never affects the
    others. logits: [num_seqs, vocab] fp32. Greedy rows (see SamplingParams.is_greedy) take the
    argmax; others draw from softmax(filtered / T) with their generator."""
    assert logits.shape[0] == len(params) == len(generators)
    tokens: list[int | Exception] = list(logits.argmax(dim=-1).tolist())
    drawn = [i for i, p in enumerate(params) if not p.is_greedy]
    if not drawn:
        return tokens
    # Checked before multinomial, for every drawn row at once (one host sync): on CUDA a NaN
    # there is a device-side assert, which would end every request on the device. Filtering
    # always keeps a token, so only the logits themselves can leave no distribution.
    rows = logits[drawn]
    unusable = (rows.isnan().any(-1) | rows.isposinf().any(-1) | rows.isneginf().all(-1)).tolist()
    for i, is_unusable in zip(drawn, unusable, strict=True):
        p = params[i]
        if is_unusable:
            tokens[i] = SamplingError(f"temperature {p.temperature}, top_p {p.top_p}, top_k "
                                      f"{p.top_k} leave no finite distribution to sample from")
            continue
        try:
            tokens[i] = _draw(logits[i], p, generators[i])
        except Exception as exc:  # noqa: BLE001 - handed back for this row only
            tokens[i] = exc
    return tokens


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """sample_each, raising the first row's exception."""
    tokens = sample_each(logits, params, generators)
    for token in tokens:
        if isinstance(token, Exception):
            raise token
    return tokens  # type: ignore[return-value]


def _draw(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: [vocab], checked usable by sample_each."""
    probs = torch.softmax(filter_logits(logits.float(), params), dim=-1)
    if gen is not None and gen.device != probs.device:
        probs = probs.to(gen.device)
    return int(torch.multinomial(probs, 1, generator=gen).item())
