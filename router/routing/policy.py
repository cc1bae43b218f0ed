"""Routing policy: estimated cost of serving a prompt on each candidate worker; pick the cheapest
that is not overloaded. Pure: no I/O, no clocks; the caller supplies matches and loads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvmesh.router.errors import NoCandidate
from kvmesh.router.routing.index import PrefixMatch


@dataclass(frozen=True)
class CostModel:
    """Per-token costs in milliseconds. Defaults are CPU-scale guesses; only ratios matter."""

    prefill_ms_per_token: float = 1.0  # computing a missed token
    host_ms_per_token: float = 0.05  # copying a token's KV from the worker's host tier
    store_ms_per_token: float = 0.2  # fetching a token's KV from the shared store
    queued_ms_per_token: float = 1.0  # waiting behind a queued prefill token
    running_ms_per_request: float = 2.0  # slowdown from each request decoding on the worker

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value < 0:
                raise ValueError(f"CostModel.{name} must be >= 0, got {value}")


class LoadLike(Protocol):
    """What the policy reads of a worker's load (WorkerLoad, or the pool's live handle)."""

    num_inflight: int
    num_queued_tokens: int
    num_cached_pages: int


@dataclass(frozen=True)
class WorkerLoad:
    num_inflight: int = 0  # requests the router sent that have not finished
    num_queued_tokens: int = 0  # prompt tokens sent that have not produced a first token
    num_cached_pages: int = 0  # pages the index holds for it: ties go to the emptier cache


@dataclass(frozen=True)
class Decision:
    worker_id: str
    cost_ms: float
    num_cached_pages: int  # pages of the prompt the chosen worker holds (any tier)
    reason: str  # "prefix" (chosen for its cache) or "load" (no cache advantage)


@dataclass(frozen=True)
class BalanceThreshold:
    """A worker with `balance_abs` more requests than the least loaded one AND above
    `balance_rel` x the mean load (counting this request) is skipped."""

    balance_abs: int = 2
    balance_rel: float = 1.2


def prefill_cost_ms(
    num_prompt_tokens: int,
    page_size: int,
    match: PrefixMatch | None,
    num_store_pages: int,
    cost: CostModel,
) -> float:
    """Cost of making the prompt's KV ready on a worker: device pages free, host pages and
    shared-store pages cost their transfer, the rest is prefilled. At least the last token is
    always computed (a full hit still runs one token to produce logits)."""
    own = match.num_pages if match else 0
    device = match.num_device_pages if match else 0
    cached_tokens = min(max(own, num_store_pages) * page_size, max(num_prompt_tokens - 1, 0))
    own_tokens = min(own * page_size, cached_tokens)
    device_tokens = min(device * page_size, own_tokens)
    host_tokens = own_tokens - device_tokens
    store_tokens = cached_tokens - own_tokens
    missed = num_prompt_tokens - cached_tokens
    return (
        host_tokens * cost.host_ms_per_token
        + store_tokens * cost.store_ms_per_token
        + missed * cost.prefill_ms_per_token
    )


def eligible(loads: Mapping[str, LoadLike], balance: BalanceThreshold) -> list[str]:
    """Workers not overloaded, in the order of `loads`."""
    if not loads:
        return []
    cutoff, limit = _limits([load.num_inflight for load in loads.values()], balance)
    return [w for w, load in loads.items()
            if load.num_inflight < cutoff or load.num_inflight + 1 <= limit]


def _limits(inflight: list[int], balance: BalanceThreshold) -> tuple[int, float]:
    """(abs cutoff, rel limit): a worker is overloaded when num_inflight >= cutoff AND
    num_inflight + 1 > limit."""
    cutoff = min(inflight) + balance.balance_abs
    limit = balance.balance_rel * (sum(inflight) + 1) / len(inflight)
    return cutoff, limit


def choose(
    num_prompt_tokens: int,
    page_size: int,
    matches: Mapping[str, PrefixMatch],
    loads: Mapping[str, LoadLike],
    *,
    num_store_pages: int = 0,
    cost: CostModel | None = None,
    balance: BalanceThreshold | None = None,
    exclude: Sequence[str] = (),
) -> Decision:
    """The cheapest eligible worker among `loads` (the candidates) minus `exclude`.
    Ties go to the lower load, then to the emptier cache (new prefixes spread out instead of
    evicting a full cache), then to the earlier candidate. Raises NoCandidate.
    One pass over the candidates: at 1,000 workers this is the decision's main cost."""
    cost = cost or CostModel()
    balance = balance or BalanceThreshold()
    if exclude:
        loads = {w: load for w, load in loads.items() if w not in exclude}
    if not loads:
        raise NoCandidate("no healthy worker")
    cutoff, limit = _limits([load.num_inflight for load in loads.values()], balance)
    no_cache = prefill_cost_ms(num_prompt_tokens, page_size, None, num_store_pages, cost)
    per_queued, per_running = cost.queued_ms_per_token, cost.running_ms_per_request
    best_worker: str | None = None
    best_total = best_inflight = best_prefill = best_pages = 0.0
    for worker_id, load in loads.items():
        inflight = load.num_inflight
        if inflight >= cutoff and inflight + 1 > limit:
            continue
        match = matches.get(worker_id)
        prefill = no_cache if match is None else prefill_cost_ms(
            num_prompt_tokens, page_size, match, num_store_pages, cost)
        total = prefill + load.num_queued_tokens * per_queued + inflight * per_running
        if best_worker is None or total < best_total or total == best_total and (
            inflight < best_inflight
            or inflight == best_inflight and load.num_cached_pages < best_pages
        ):
            best_worker, best_total, best_inflight = worker_id, total, inflight
            best_prefill, best_pages = prefill, load.num_cached_pages
    assert best_worker is not None  # the least loaded worker is always eligible
    match = matches.get(best_worker)
    return Decision(best_worker, best_total, match.num_pages if match else 0,
                    "prefix" if best_prefill < no_cache else "load")
