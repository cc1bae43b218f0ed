"""Keyed page MAC for shared tiers: a page in Redis (or on a shared disk) that anyone able to
write there could forge past its xxh3_64 checksum is accepted only with a valid tag.

A sealed page is `encoded page | nonce 16 B | tag 16 B`. The tag is Poly1305 over the whole
encoded page (header and payload, so key, namespace digest and token ids are covered) under a
one-time key BLAKE2b(nonce, key=secret): a fresh random nonce per write, so no Poly1305 key is
ever used twice (the construction of NaCl's secretbox, with BLAKE2b as the key generator).
Chosen by measurement (benchmarks/RESULTS.md, "Page MAC"): Poly1305 runs at ~5.5 GB/s on one
core where HMAC-SHA256 runs at ~1.5 GB/s and keyed BLAKE2b at ~0.8 GB/s, next to a Redis GET
of ~1-3 GB/s. Poly1305 is OpenSSL's, called through the libcrypto that Python's hashlib
already loads, by ctypes, so a large page is tagged with the GIL released.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import os

import numpy as np

from kvmesh.cachestore.errors import InvalidConfig

NONCE_NBYTES = 16
TAG_NBYTES = 16
TRAILER_NBYTES = NONCE_NBYTES + TAG_NBYTES
MIN_SECRET_NBYTES = 16
_PERSON_KEY = b"kvmesh-pmac-key"  # BLAKE2b personalization: domain separation (<= 16 B)
_PERSON_NONCE = b"kvmesh-pmac-otk"


def _load_poly1305():
    import _hashlib  # noqa: F401 - loads the libcrypto hashlib links against

    name = ctypes.util.find_library("crypto")
    if name is None:  # pragma: no cover - CPython's hashlib needs it
        return None
    try:
        fn = ctypes.CDLL(name).EVP_Q_mac  # OpenSSL >= 3.0
    except (OSError, AttributeError):  # pragma: no cover - depends on the system
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                   ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                   ctypes.POINTER(ctypes.c_size_t)]
    return fn


_EVP_Q_MAC = _load_poly1305()


class PageMac:
    """Seals and opens pages with one deployment secret. Thread-safe (holds no state but keys).
    Never logs or repr()s the secret."""

    def __init__(self, secret: bytes) -> None:
        if _EVP_Q_MAC is None:  # pragma: no cover - depends on the system
            raise InvalidConfig("the page MAC needs OpenSSL >= 3.0 (libcrypto's EVP_Q_mac)")
        if len(secret) < MIN_SECRET_NBYTES:
            raise InvalidConfig(f"a page MAC key must be at least {MIN_SECRET_NBYTES} bytes, "
                                f"got {len(secret)}")
        self._key = hashlib.blake2b(secret, digest_size=32, person=_PERSON_KEY).digest()

    def __repr__(self) -> str:
        return "PageMac(<secret>)"

    def trailer(self, page: bytes | memoryview) -> bytes:
        """The 32 bytes to store right after `page`: a fresh nonce and the tag."""
        nonce = os.urandom(NONCE_NBYTES)
        return nonce + self._tag(nonce, page)

    def open(self, sealed: bytes | memoryview) -> memoryview | None:
        """The page inside `sealed` (a view, no copy) if its tag verifies; None otherwise
        (forged, altered, sealed with another secret, or too short to hold a trailer)."""
        view = memoryview(sealed).cast("B")
        if view.nbytes <= TRAILER_NBYTES:
            return None
        page = view[:-TRAILER_NBYTES]
        nonce = bytes(view[-TRAILER_NBYTES:-TAG_NBYTES])
        if not hmac.compare_digest(self._tag(nonce, page), view[-TAG_NBYTES:]):
            return None
        return page

    def _tag(self, nonce: bytes, page: bytes | memoryview) -> bytes:
        one_time_key = hashlib.blake2b(nonce, key=self._key, digest_size=32,
                                       person=_PERSON_NONCE).digest()
        data = memoryview(page).cast("B")
        address = np.frombuffer(data, dtype=np.uint8).ctypes.data if data.nbytes else None
        out = ctypes.create_string_buffer(TAG_NBYTES)
        out_nbytes = ctypes.c_size_t()
        # ctypes releases the GIL for the call: large pages tag in parallel on several threads
        if not _EVP_Q_MAC(None, b"POLY1305", None, None, None, one_time_key, 32, address,
                          data.nbytes, out, TAG_NBYTES, ctypes.byref(out_nbytes)):
            raise RuntimeError("OpenSSL Poly1305 failed")  # assert-like: never expected
        return out.raw


def read_secret(value: str | None, path: str | None, what: str) -> bytes | None:
    """A MAC secret from its env value or its file (trailing newline stripped); None if neither.
    Raises InvalidConfig when the file cannot be read or the secret is too short."""
    if path is not None:
        try:
            with open(path, "rb") as f:
                secret = f.read().rstrip(b"\r\n")
        except OSError as e:
            raise InvalidConfig(f"{what} file {path!r} cannot be read: {e}") from None
    elif value is not None:
        secret = value.encode()
    else:
        return None
    if len(secret) < MIN_SECRET_NBYTES:
        raise InvalidConfig(f"{what} must be at least {MIN_SECRET_NBYTES} bytes, "
                            f"got {len(secret)}")
    return secret
