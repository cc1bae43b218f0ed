"""Namespace digest and chained page keys: the one implementation every part uses.

Pure Python (xxhash only, no torch) so the block manager and the router can import it cheaply.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import xxhash

from kvmesh.cachestore.errors import InvalidNamespace

KEY_NBYTES = 16
LAYOUT_VERSION = 1
_SEED = 0  # fixed: keys must agree across processes and machines

# Element size of each KV dtype the page codec knows; the index is the dtype's wire code.
DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "float8_e4m3fn": 4,
    "float8_e5m2": 5,
}
DTYPE_NBYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


def dtype_name(dtype: Any) -> str:
    """Canonical name of a torch dtype (or of its name as a string): "bfloat16", "float32", ..."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise InvalidNamespace(f"unsupported KV dtype {dtype!r}; one of {sorted(DTYPE_CODES)}")
    return name


@dataclass(frozen=True)
class Namespace:
    """Identity of a KV cache: every field that, if it differed, would make pages incompatible.

    `digest` (16 bytes) seeds every page key, so changing any field changes every key.
    `salt` is the tenant salt; servers derive it from the caller's identity, never from a body.
    """

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # torch.dtype or its name; kept as given. Equality and hashing use the canonical name, so
    # Namespace(dtype=torch.bfloat16) == Namespace(dtype="bfloat16").
    dtype: Any = field(compare=False)
    page_size: int = 16
    salt: str = ""
    weights_fingerprint: str = ""
    tokenizer_fingerprint: str = ""
    lora_id: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    layout_version: int = LAYOUT_VERSION
    _dtype_name: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidNamespace("namespace model must not be empty")
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidNamespace(f"namespace {name} must be a positive int, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise InvalidNamespace(f"tp_rank {self.tp_rank} not in [0, {self.tp_size})")
        object.__setattr__(self, "_dtype_name", dtype_name(self.dtype))

    @property
    def dtype_name(self) -> str:
        return self._dtype_name

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one page's payload: [num_layers, 2, page_size, num_kv_heads, head_dim]."""
        return (self.num_layers, 2, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def page_nbytes(self) -> int:
        n = 1
        for dim in self.page_shape:
            n *= dim
        return n * DTYPE_NBYTES[self._dtype_name]

    @cached_property
    def digest(self) -> bytes:
        return namespace_digest(self)

    def with_salt(self, salt: str) -> Namespace:
        """The same namespace for another tenant."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}
        fields["salt"] = salt
        return Namespace(**fields)

    def page_keys(self, token_ids: Sequence[int] | np.ndarray) -> list[bytes]:
        return page_keys(self.digest, token_ids, self.page_size)


class SaltedNamespaces:
    """Each base namespace's salted copy for recent tenant salts, built once (its digest is
    hashed once). Holds at most `capacity`, dropping the least recently used: salts come from
    callers, and a copy that is dropped is rebuilt equal. Not thread-safe."""

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._by_key: OrderedDict[tuple[bytes, str], Namespace] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, base: Namespace, salt: str) -> Namespace:
        """`base.with_salt(salt)`, cached."""
        if salt == base.salt:
            return base
        key = (base.digest, salt)
        salted = self._by_key.get(key)
        if salted is not None:
            self._by_key.move_to_end(key)
            return salted
        salted = self._by_key[key] = base.with_salt(salt)
        if len(self._by_key) > self.capacity:
            self._by_key.popitem(last=False)
        return salted


def namespace_digest(ns: Namespace) -> bytes:
    """xxh3_128 over a length-prefixed encoding of every identity field, in a fixed order."""
    parts: list[tuple[str, str]] = [
        ("model", ns.model),
        ("weights_fingerprint", ns.weights_fingerprint),
        ("tokenizer_fingerprint", ns.tokenizer_fingerprint),
        ("kv_dtype", ns.dtype_name),
        ("layout_version", str(ns.layout_version)),
        ("num_layers", str(ns.num_layers)),
        ("num_kv_heads", str(ns.num_kv_heads)),
        ("head_dim", str(ns.head_dim)),
        ("page_size", str(ns.page_size)),
        ("tp_rank", str(ns.tp_rank)),
        ("tp_size", str(ns.tp_size)),
        ("lora_id", ns.lora_id),
        ("salt", ns.salt),
    ]
    buf = bytearray(b"kvmesh-namespace-v1")
    for name, value in parts:
        for item in (name.encode(), value.encode("utf-8")):
            buf += struct.pack("<I", len(item))
            buf += item
    return xxhash.xxh3_128_digest(bytes(buf), seed=_SEED)


def tokens_to_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian int32 bytes (the form keys, pages and the wire use)."""
    arr = np.asarray(token_ids, dtype="<i4")
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {arr.shape}")
    return arr.tobytes()


def tokens_from_bytes(data: bytes | memoryview) -> np.ndarray:
    if len(data) % 4:
        raise ValueError(f"token id bytes must be a multiple of 4, got {len(data)}")
    return np.frombuffer(data, dtype="<i4")


def page_keys(
    namespace_digest: bytes, token_ids: Sequence[int] | np.ndarray, page_size: int
) -> list[bytes]:
    """Chained keys of every full page: key[i] = xxh3_128(key[i-1] || tokens of page i).

    key[-1] is the namespace digest. A trailing partial page gets no key.
    """
    data = tokens_to_bytes(token_ids)
    return chain_keys(namespace_digest, data, page_size)


def chain_keys(
    parent: bytes, token_bytes: bytes, page_size: int, start_page: int = 0
) -> list[bytes]:
    """Keys of the full pages of `token_bytes` (little-endian int32) from `start_page` on,
    chained from `parent` (the key of page start_page - 1, or the namespace digest)."""
    page_nbytes = 4 * page_size
    num_pages = len(token_bytes) // page_nbytes
    view = memoryview(token_bytes)
    keys: list[bytes] = []
    prev = parent
    digest = xxhash.xxh3_128_digest
    for i in range(start_page, num_pages):
        prev = digest(prev + view[i * page_nbytes : (i + 1) * page_nbytes], seed=_SEED)
        keys.append(prev)
    return keys

