"""Page codec: the bytes of one page in every tier.

Layout (little-endian):
    magic "KVMP" | layout version u16 | dtype code u8 | reserved u8 | key 16B | namespace digest 16B
    | num_layers u32 | page_size u32 | num_kv_heads u32 | head_dim u32 | payload_nbytes u64
    | xxh3_64(payload) u64 | token ids page_size x int32 | payload
payload = [num_layers, 2, page_size, num_kv_heads, head_dim] contiguous in the KV dtype.
No pickle: every field is fixed-width and checked on decode.

One page at a time here; many pages at once (headers compared in place, decode on the bulk
pool) in codec_batch.py.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xxhash

from kvmesh.cachestore.errors import PageCorrupt
from kvmesh.cachestore.keys import DTYPE_CODES, DTYPE_NBYTES, KEY_NBYTES, LAYOUT_VERSION, Namespace

MAGIC = b"KVMP"
_FIXED = struct.Struct("<4sHBB16s16sIIIIQQ")
HEADER_FIXED_NBYTES = _FIXED.size
_DTYPE_BY_CODE = {code: name for name, code in DTYPE_CODES.items()}

# python-xxhash holds the GIL while it hashes, so threads would hash one at a time. Its extension
# exports the C function, and a ctypes call releases the GIL: pages hashed on the bulk pool then
# really run in parallel. Falls back to the Python binding if the symbol is ever missing.
_GIL_FREE_MIN_BYTES = 64 << 10


def _gil_free_xxh3_64() -> Callable[[int, int], int] | None:
    try:
        # the stubs leave out the C extension module: it is there in every xxhash wheel
        fn = ctypes.CDLL(xxhash._xxhash.__file__).XXH3_64bits  # type: ignore[attr-defined]
    except (AttributeError, OSError):  # pragma: no cover - depends on the xxhash build
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_uint64
    return fn


_XXH3_64 = _gil_free_xxh3_64()


def checksum_at(address: int, nbytes: int) -> int:
    """xxh3_64 of `nbytes` bytes at `address` (memory the caller keeps alive); GIL released."""
    if _XXH3_64 is not None:
        return _XXH3_64(address, nbytes)
    return xxhash.xxh3_64_intdigest((ctypes.c_char * nbytes).from_address(address))


def checksum(payload: bytes | memoryview) -> int:
    """xxh3_64 of a buffer, the page checksum; a large one hashes with the GIL released."""
    view = memoryview(payload).cast("B")
    if view.nbytes < _GIL_FREE_MIN_BYTES or _XXH3_64 is None:
        return xxhash.xxh3_64_intdigest(view)
    return _XXH3_64(np.frombuffer(view, dtype=np.uint8).ctypes.data, view.nbytes)


@dataclass(frozen=True)
class PageHeader:
    key: bytes
    namespace_digest: bytes
    dtype_name: str
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    payload_nbytes: int
    checksum: int
    token_ids: np.ndarray  # [page_size] int32

    @property
    def nbytes(self) -> int:
        """Header bytes, i.e. the payload's offset in an encoded page."""
        return HEADER_FIXED_NBYTES + 4 * self.page_size


def header_nbytes(page_size: int) -> int:
    return HEADER_FIXED_NBYTES + 4 * page_size


def payload_offset(ns: Namespace) -> int:
    """Where the payload starts in every encoded page of `ns` (the header's size)."""
    return header_nbytes(ns.page_size)


def page_nbytes(ns: Namespace) -> int:
    """Size of every encoded page of `ns`, header included."""
    return header_nbytes(ns.page_size) + ns.page_nbytes


def encode_header(ns: Namespace, key: bytes, token_ids: bytes, payload_checksum: int) -> bytes:
    """The header of a page of `ns` (every byte before its payload), for a caller that writes
    the payload itself (e.g. straight into a store's slot): `token_ids` are the page's
    little-endian int32 bytes, `payload_checksum` the payload's xxh3_64 (`checksum`)."""
    if len(key) != KEY_NBYTES:
        raise ValueError(f"page key must be {KEY_NBYTES} bytes, got {len(key)}")
    if len(token_ids) != 4 * ns.page_size:
        raise ValueError(f"page needs {ns.page_size} token ids, got {len(token_ids) // 4}")
    fixed = _FIXED.pack(
        MAGIC,
        LAYOUT_VERSION,
        DTYPE_CODES[ns.dtype_name],
        0,
        key,
        ns.digest,
        ns.num_layers,
        ns.page_size,
        ns.num_kv_heads,
        ns.head_dim,
        ns.page_nbytes,
        payload_checksum,
    )
    return fixed + bytes(token_ids)


def encode_page(ns: Namespace, key: bytes, token_ids: bytes, payload: bytes | memoryview) -> bytes:
    """One encoded page. `token_ids` are the page's little-endian int32 bytes; `payload` is
    exactly `ns.page_nbytes` bytes. Returns a new bytes object (header + payload)."""
    payload = memoryview(payload).cast("B")
    if payload.nbytes != ns.page_nbytes:
        raise ValueError(f"page payload must be {ns.page_nbytes} bytes, got {payload.nbytes}")
    return b"".join((encode_header(ns, key, token_ids, checksum(payload)), payload))


def decode_header(blob: bytes | memoryview) -> PageHeader:
    """Parse and sanity-check the header only (no checksum); used to rebuild indexes."""
    view = memoryview(blob).cast("B")
    if view.nbytes < HEADER_FIXED_NBYTES:
        raise PageCorrupt(f"page too short: {view.nbytes} bytes")
    (magic, version, dtype_code, reserved, key, digest, num_layers, page_size, num_kv_heads,
     head_dim, payload_nbytes, checksum) = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise PageCorrupt("bad page magic")
    if reserved != 0:  # written as 0: any other value is a flipped bit
        raise PageCorrupt(f"page reserved byte is {reserved}, expected 0")
    if version != LAYOUT_VERSION:
        raise PageCorrupt(f"page layout version {version}, expected {LAYOUT_VERSION}")
    dtype = _DTYPE_BY_CODE.get(dtype_code)
    if dtype is None:
        raise PageCorrupt(f"unknown dtype code {dtype_code}")
    expected = num_layers * 2 * page_size * num_kv_heads * head_dim * DTYPE_NBYTES[dtype]
    if payload_nbytes != expected:
        raise PageCorrupt(f"payload size {payload_nbytes} does not match shape ({expected})")
    token_end = HEADER_FIXED_NBYTES + 4 * page_size
    if view.nbytes != token_end + payload_nbytes:
        raise PageCorrupt(f"page is {view.nbytes} bytes, header says {token_end + payload_nbytes}")
    token_ids = np.frombuffer(view[HEADER_FIXED_NBYTES:token_end], dtype="<i4")
    return PageHeader(key, digest, dtype, num_layers, page_size, num_kv_heads, head_dim,
                      payload_nbytes, checksum, token_ids)


# byte offsets in the fixed header: key, then namespace digest .. payload size, then checksum
KEY_AT, DIGEST_AT, CHECKSUM_AT = 8, 24, 64
_TEMPLATES: dict[bytes, tuple[bytes, int]] = {}
_MAX_TEMPLATES = 4096


def header_template(ns: Namespace) -> tuple[bytes, int]:
    """(the fixed header of a page of `ns` with zero key and checksum, its encoded size). Keyed by
    the namespace digest, which covers the dtype, shape and layout version."""
    template = _TEMPLATES.get(ns.digest)
    if template is None:
        if len(_TEMPLATES) >= _MAX_TEMPLATES:  # one per namespace (tenant): keep it bounded
            _TEMPLATES.clear()
        fixed = _FIXED.pack(MAGIC, LAYOUT_VERSION, DTYPE_CODES[ns.dtype_name], 0, bytes(16),
                            ns.digest, ns.num_layers, ns.page_size, ns.num_kv_heads, ns.head_dim,
                            ns.page_nbytes, 0)
        template = _TEMPLATES[ns.digest] = (fixed, header_nbytes(ns.page_size) + ns.page_nbytes)
    return template


def check_page_header(
    blob: bytes | memoryview,
    ns: Namespace,
    key: bytes,
    token_ids: bytes,
) -> tuple[memoryview, int]:
    """Everything `decode_page` verifies except the payload checksum: returns (payload view into
    `blob`, the checksum its header records), so a caller that copies the payload can hash the
    copy instead (one pass over the source). Raises PageCorrupt.

    A page whose header is byte for byte what `ns`, `key` and `token_ids` predict (every field
    but the checksum) passes on a few slice compares; any other goes through `decode_header`,
    which names what is wrong."""
    view = memoryview(blob).cast("B")
    expected, nbytes = header_template(ns)
    tokens_end = HEADER_FIXED_NBYTES + 4 * ns.page_size
    if (view.nbytes == nbytes and view[:KEY_AT] == expected[:KEY_AT]
            and view[KEY_AT:DIGEST_AT] == key
            and view[DIGEST_AT:CHECKSUM_AT] == expected[DIGEST_AT:CHECKSUM_AT]
            and view[HEADER_FIXED_NBYTES:tokens_end] == token_ids):
        return view[tokens_end:], int.from_bytes(view[CHECKSUM_AT:HEADER_FIXED_NBYTES], "little")
    header = decode_header(blob)
    if header.key != key:
        raise PageCorrupt("page key mismatch")
    if header.namespace_digest != ns.digest:
        raise PageCorrupt("page namespace mismatch")
    if (header.dtype_name, header.num_layers, header.page_size, header.num_kv_heads,
            header.head_dim) != (ns.dtype_name, ns.num_layers, ns.page_size, ns.num_kv_heads,
                                 ns.head_dim):
        raise PageCorrupt("page shape or dtype mismatch")
    if header.token_ids.tobytes() != token_ids:
        raise PageCorrupt("page token ids differ (hash collision)")
    return memoryview(blob).cast("B")[header.nbytes :], header.checksum


def decode_page(
    blob: bytes | memoryview,
    ns: Namespace,
    key: bytes,
    token_ids: bytes,
) -> memoryview:
    """Verify an encoded page against what the caller asked for and return its payload (a view
    into `blob`, no copy). Raises PageCorrupt on any mismatch: magic, version, namespace, key,
    shape, dtype, token ids (hash collision safety) or payload checksum."""
    payload, recorded = check_page_header(blob, ns, key, token_ids)
    if checksum(payload) != recorded:
        raise PageCorrupt("page checksum mismatch")
    return payload
