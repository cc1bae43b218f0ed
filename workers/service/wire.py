"""Worker wire forms: GenerateRequest -> engine inputs (checked), engine outputs -> pb2 messages.

Every check of caller input lives here so each bad request gets one clear INVALID_ARGUMENT
message before it reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmesh.cachestore.rpc.wire import TIER_BY_NAME, is_host_port, namespace_to_spec
from kvmesh.v1 import common_pb2, worker_pb2
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.errors import InvalidRequest

# Engine tier names -> wire tiers. "store" is the shared store reached over gRPC.
ENGINE_TIERS: dict[str, Any] = {**TIER_BY_NAME, "store": common_pb2.TIER_REMOTE}
FINISH_REASONS: dict[str | None, Any] = {  # values: worker_pb2.FinishReason
    None: worker_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": worker_pb2.FINISH_REASON_STOP,
    "length": worker_pb2.FINISH_REASON_LENGTH,
    "abort": worker_pb2.FINISH_REASON_ABORT,
}
MAX_REQUEST_ID_CHARS = 256
MAX_STOP_CHARS = 256
# A salt is a hex digest (32 characters); anything far longer is a caller's mistake or an attack
# on the worker's memory (each salt is kept with its namespace).
MAX_TENANT_SALT_CHARS = 128
MAX_ADDRESS_CHARS = 256


@dataclass(frozen=True)
class RequestLimits:
    """What the engine accepts, read once after it is loaded."""

    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    page_size: int


def parse_generate_request(
    request: worker_pb2.GenerateRequest, limits: RequestLimits
) -> tuple[list[int], SamplingParams]:
    """Checked prompt and sampling params of a request. Raises InvalidRequest with a message
    that names the field. `max_tokens` 0 means "up to the context length"; `n` 0 means 1."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    if len(request.tenant_salt) > MAX_TENANT_SALT_CHARS:
        raise InvalidRequest(f"tenant_salt is longer than {MAX_TENANT_SALT_CHARS} characters")
    prompt = list(request.prompt_token_ids)
    if not prompt:
        raise InvalidRequest("prompt_token_ids must not be empty")
    if len(prompt) >= limits.max_model_len:
        raise InvalidRequest(
            f"prompt has {len(prompt)} tokens; this model's context length is "
            f"{limits.max_model_len}, leaving no room for one generated token"
        )
    bad = next((t for t in prompt if t >= limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, "
                             f"{limits.vocab_size})")
    s = request.sampling
    room = limits.max_model_len - len(prompt)
    max_tokens = s.max_tokens or room
    if max_tokens > room:
        raise InvalidRequest(
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
            f"length {limits.max_model_len}"
        )
    n = s.n or 1
    if request.push_to and not request.prefill_only:
        raise InvalidRequest("push_to goes with prefill_only")
    if request.push_to:
        _check_address(request.push_to, "push_to")
    if request.prefill_only:  # the first token only; a decode worker samples the rest
        if n != 1:
            raise InvalidRequest(f"prefill_only requests take n = 1, got {n}")
        max_tokens = 1
    if n > limits.max_num_seqs:
        raise InvalidRequest(f"n must be at most {limits.max_num_seqs}, got {n}")
    # SamplingParams checks every field (NaN and inf included) and raises InvalidRequest
    # naming it; temperatures below MIN_TEMPERATURE sample greedily.
    sampling = SamplingParams(
        temperature=float(s.temperature),
        top_p=float(s.top_p) if s.top_p != 0 else 1.0,
        top_k=min(int(s.top_k), limits.vocab_size),  # past the vocabulary: every token stays
        seed=int(s.seed) if s.HasField("seed") else None,
        max_tokens=int(max_tokens),
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=bool(s.ignore_eos),
        n=int(n),
    )
    sampling.validate(vocab_size=limits.vocab_size)
    if any(len(x) > MAX_STOP_CHARS for x in sampling.stop):
        raise InvalidRequest(f"stop strings must be at most {MAX_STOP_CHARS} characters")
    return prompt, sampling


def _check_address(address: str, field: str) -> None:
    if len(address) > MAX_ADDRESS_CHARS or not is_host_port(address):
        raise InvalidRequest(f"{field} must be HOST:PORT, got {address[:MAX_ADDRESS_CHARS]!r}")


def parse_push_request(request: worker_pb2.PushPagesRequest, limits: RequestLimits
                       ) -> tuple[list[int], int, list[bytes]]:
    """Checked (prompt, first page, pages) of a PushPages call; the pages themselves are
    checked against the namespace when taken (engine.page_exchange)."""
    if len(request.tenant_salt) > MAX_TENANT_SALT_CHARS:
        raise InvalidRequest(f"tenant_salt is longer than {MAX_TENANT_SALT_CHARS} characters")
    prompt = list(request.prompt_token_ids)
    if not prompt or len(prompt) >= limits.max_model_len:
        raise InvalidRequest(f"prompt_token_ids must have 1 to {limits.max_model_len - 1} "
                             f"tokens, got {len(prompt)}")
    num_full = len(prompt) // limits.page_size
    end = request.first_page + len(request.pages)
    if end > num_full:
        raise InvalidRequest(f"pages {request.first_page}..{end} past the prompt's {num_full} "
                             "full pages")
    return prompt, request.first_page, list(request.pages)


def usage_to_pb(usage: Any) -> worker_pb2.Usage:
    return worker_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cached_tokens_by_tier={k: int(v) for k, v in usage.cached_tokens_by_tier.items() if v},
    )


def output_to_pb(request_id: str, output: Any, *, with_finish: bool = True
                 ) -> worker_pb2.GenerateResponse:
    """One engine RequestOutput as a GenerateResponse carrying the caller's request id;
    `with_finish` False leaves out its finish reason and usage (`finish_to_pb` sends them)."""
    message = worker_pb2.GenerateResponse(
        request_id=request_id,
        index=output.index,
        token_ids=output.new_token_ids,
        text=output.text_delta,
    )
    if with_finish:
        message.MergeFrom(finish_to_pb(request_id, output))
    return message


def finish_to_pb(request_id: str, output: Any) -> worker_pb2.GenerateResponse:
    """An output's finish reason and usage alone, as a GenerateResponse."""
    message = worker_pb2.GenerateResponse(request_id=request_id, index=output.index,
                                          finish_reason=FINISH_REASONS[output.finish_reason])
    if output.usage is not None:
        message.usage.CopyFrom(usage_to_pb(output.usage))
    return message


def event_to_pb(seq: int, event: Any, epoch: int) -> worker_pb2.KvEvent:
    """A KvEventData (or None for AllCleared) as a KvEvent with sequence number `seq`."""
    if event is None:
        return worker_pb2.KvEvent(seq=seq, cleared=worker_pb2.AllCleared(epoch=epoch))
    tier: Any = ENGINE_TIERS.get(event.tier, common_pb2.TIER_UNSPECIFIED)
    if event.kind == "stored":
        return worker_pb2.KvEvent(
            seq=seq,
            stored=worker_pb2.PagesStored(keys=event.keys, parent=event.parent or b"", tier=tier),
        )
    if event.kind == "removed":
        return worker_pb2.KvEvent(seq=seq, removed=worker_pb2.PagesRemoved(keys=event.keys,
                                                                             tier=tier))
    raise ValueError(f"unknown KV event kind {event.kind!r}")


def stats_to_pb(
    engine: Any, stats: Any, namespace: Any, epoch: int, kv_events_seq: int, role: str = "both"
) -> worker_pb2.WorkerStats:
    """Stats message from an EngineStats snapshot and the engine's fixed attributes (model name,
    page size, context length: safe to read from any thread)."""
    return worker_pb2.WorkerStats(
        model=engine.model_name,
        page_size=engine.page_size,
        num_pages_total=stats.num_pages_total,
        num_pages_free=stats.num_pages_free,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        # The engine counts pages; the wire counts tokens.
        prefix_queries=stats.prefix_queries * engine.page_size,
        prefix_hits={k: int(v) * engine.page_size for k, v in stats.prefix_hits.items()},
        epoch=epoch,
        max_model_len=engine.max_model_len,
        namespace=namespace_to_spec(namespace),
        kv_events_seq=kv_events_seq,
        role=role,
    )
