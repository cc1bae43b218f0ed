"""What the engine hands back: per-step request outputs, usage, stats and KV events."""

from __future__ import annotations

from dataclasses import dataclass, field

TIERS = ("device", "cpu", "store")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """New tokens of one completion (`index` of n) since the last step. `finish_reason` and
    `usage` are set on the completion's final output only; "error" comes with `error`, the
    message of a request the engine quarantined (aborted alone after it raised in the step)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    text_delta: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    usage: Usage | None = None
    error: str | None = None


@dataclass
class KvEventData:
    """Pages that entered ("stored") or left ("removed") a tier, or the whole cache ("cleared").
    `parent` is the key of the page before keys[0] (None for a sequence's first page)."""

    kind: str
    keys: list[bytes]
    parent: bytes | None = None
    tier: str = "device"


@dataclass
class EngineStats:
    num_pages_total: int
    num_pages_free: int
    num_running: int
    num_waiting: int
    prefix_queries: int  # full prompt pages looked up
    prefix_hits: dict[str, int] = field(default_factory=dict)  # pages found, by tier
    num_preemptions: int = 0
    num_store_writes_dropped: int = 0
