"""One store call's validated tokens: page keys and each page's token bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.keys import Namespace, chain_keys

MAX_TOKEN_ID = 2**31 - 1


def token_ids_bytes(token_ids) -> bytes:
    """Little-endian int32 bytes of a non-empty 1-D sequence of integer token ids in
    [0, 2**31); anything else raises InvalidRequest saying what is wrong."""
    try:
        arr = np.asarray(token_ids)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"token ids must be a 1-D sequence of ints: {e}") from e
    if arr.ndim != 1:
        raise InvalidRequest(f"token ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise InvalidRequest("token ids must not be empty")
    if arr.dtype.kind not in "iu":
        raise InvalidRequest(f"token ids must be integers, got {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID:
        raise InvalidRequest(f"token ids must be in [0, {MAX_TOKEN_ID}], got "
                             f"[{int(arr.min())}, {int(arr.max())}]")
    return arr.astype("<i4", copy=False).tobytes()


@dataclass(frozen=True)
class PageRequest:
    """Keys of every full page of a token sequence, and each page's token bytes."""

    keys: list[bytes]
    token_bytes: bytes
    page_token_nbytes: int

    @classmethod
    def of(cls, ns: Namespace, token_ids) -> PageRequest:
        token_bytes = token_ids_bytes(token_ids)
        return cls(chain_keys(ns.digest, token_bytes, ns.page_size), token_bytes,
                   4 * ns.page_size)

    def page_tokens(self, index: int) -> bytes:
        n = self.page_token_nbytes
        return self.token_bytes[index * n : (index + 1) * n]
