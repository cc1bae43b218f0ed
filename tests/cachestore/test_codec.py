"""Page codec: round trip, and every corruption detected."""

from __future__ import annotations

import numpy as np
import pytest

from kvmesh.cachestore.bulk_pool import ChunkedTasks
from kvmesh.cachestore.codec import (
    HEADER_FIXED_NBYTES,
    PageCorrupt,
    check_page_header,
    decode_header,
    decode_page,
    encode_page,
    header_nbytes,
)
from kvmesh.cachestore.codec_batch import check_page_headers_at, decode_pages
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes

NS = Namespace("m", num_layers=3, num_kv_heads=2, head_dim=4, dtype="bfloat16", page_size=5)
TOKENS = [7, 11, 13, 17, 19]


@pytest.fixture
def page():
    payload = np.random.default_rng(0).integers(0, 256, NS.page_nbytes, dtype=np.uint8).tobytes()
    key = NS.page_keys(TOKENS)[0]
    return key, payload, encode_page(NS, key, tokens_to_bytes(TOKENS), payload)


def test_round_trip(page):
    key, payload, blob = page
    assert len(blob) == header_nbytes(5) + NS.page_nbytes == 72 + 20 + 3 * 2 * 5 * 2 * 4 * 2
    out = decode_page(blob, NS, key, tokens_to_bytes(TOKENS))
    assert bytes(out) == payload
    assert out.obj is blob  # a view into the stored blob, no copy
    header = decode_header(blob)
    assert (header.key, header.namespace_digest, header.dtype_name) == (key, NS.digest,
                                                                       "bfloat16")
    assert (header.num_layers, header.page_size, header.num_kv_heads, header.head_dim) == (
        3, 5, 2, 4)
    assert header.token_ids.tolist() == TOKENS
    assert header.nbytes == header_nbytes(5)


def test_every_flipped_byte_is_detected(page):
    key, _, blob = page
    tokens = tokens_to_bytes(TOKENS)
    for offset in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[offset] ^= bit
            with pytest.raises(PageCorrupt):
                decode_page(bytes(bad), NS, key, tokens)


def test_header_check_catches_every_header_flip_but_the_checksum(page):
    """check_page_header (no payload hash) rejects a flip anywhere in the header and token ids,
    except in the recorded checksum, which it returns for the caller to compare."""
    key, payload, blob = page
    tokens = tokens_to_bytes(TOKENS)
    got, checksum = check_page_header(blob, NS, key, tokens)
    assert bytes(got) == payload and checksum == decode_header(blob).checksum
    checksum_bytes = range(HEADER_FIXED_NBYTES - 8, HEADER_FIXED_NBYTES)
    for offset in range(header_nbytes(5)):
        bad = bytearray(blob)
        bad[offset] ^= 0x04
        if offset in checksum_bytes:
            assert check_page_header(bytes(bad), NS, key, tokens)[1] != checksum
        else:
            with pytest.raises(PageCorrupt):
                check_page_header(bytes(bad), NS, key, tokens)


def test_bulk_header_check_stops_at_the_first_header_that_differs():
    """check_page_headers_at over pages at one stride (with a gap between slots) agrees with
    check_page_header page by page: every header byte but the checksum's, flipped in page 3 of
    6, ends the list there; the checksums of the pages before it come back."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 1000, 6 * 5).tolist()
    keys = NS.page_keys(tokens)
    token_bytes = [tokens_to_bytes(tokens[5 * i : 5 * i + 5]) for i in range(6)]
    blobs = [encode_page(NS, keys[i], token_bytes[i],
                         rng.integers(0, 256, NS.page_nbytes, dtype=np.uint8).tobytes())
             for i in range(6)]
    pitch = len(blobs[0]) + 24
    arena = np.zeros(pitch * 6, dtype=np.uint8)
    for i, blob in enumerate(blobs):
        arena[i * pitch : i * pitch + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    address = arena.ctypes.data
    checksums = [check_page_header(b, NS, k, t)[1]
                 for b, k, t in zip(blobs, keys, token_bytes, strict=True)]
    everything = b"".join(token_bytes)
    assert check_page_headers_at(address, pitch, 6, NS, keys, everything) == checksums
    assert check_page_headers_at(address + pitch, pitch, 2, NS, keys[1:3],
                                 everything[20:60]) == checksums[1:3]
    checksum_bytes = range(HEADER_FIXED_NBYTES - 8, HEADER_FIXED_NBYTES)
    for offset in range(header_nbytes(5)):
        arena[3 * pitch + offset] ^= 0x04
        got = check_page_headers_at(address, pitch, 6, NS, keys, everything)
        if offset in checksum_bytes:
            assert len(got) == 6 and got[3] != checksums[3]
        else:
            assert got == checksums[:3]
        arena[3 * pitch + offset] ^= 0x04
    with pytest.raises(ValueError, match="overlap"):
        check_page_headers_at(address, 40, 2, NS, keys[:2], everything[:40])
    with pytest.raises(ValueError, match="count"):
        check_page_headers_at(address, pitch, 2, NS, keys[:3], everything[:40])
    with pytest.raises(ValueError, match="count"):
        check_page_headers_at(address, pitch, 2, NS, keys[:2], everything[:44])


def test_truncated_or_extended_is_detected(page):
    key, _, blob = page
    tokens = tokens_to_bytes(TOKENS)
    for bad in (blob[:-1], blob + b"\0", blob[:10], b"", blob[: header_nbytes(5)]):
        with pytest.raises(PageCorrupt):
            decode_page(bad, NS, key, tokens)


def test_mismatches_name_the_reason(page):
    key, _, blob = page
    tokens = tokens_to_bytes(TOKENS)
    with pytest.raises(PageCorrupt, match="key mismatch"):
        decode_page(blob, NS, bytes(16), tokens)
    with pytest.raises(PageCorrupt, match="namespace mismatch"):
        decode_page(blob, NS.with_salt("other"), key, tokens)
    with pytest.raises(PageCorrupt, match="collision"):
        decode_page(blob, NS, key, tokens_to_bytes([7, 11, 13, 17, 20]))


def test_encode_rejects_wrong_sizes(page):
    key, payload, _ = page
    tokens = tokens_to_bytes(TOKENS)
    with pytest.raises(ValueError, match="16 bytes"):
        encode_page(NS, key[:8], tokens, payload)
    with pytest.raises(ValueError, match="5 token ids"):
        encode_page(NS, key, tokens[:16], payload)
    with pytest.raises(ValueError, match=f"{NS.page_nbytes} bytes"):
        encode_page(NS, key, tokens, payload[:-2])


@pytest.mark.parametrize("num_pages", [3, 37])  # 37 pages of 256 KiB take the thread-pool path
def test_decode_pages_matches_decode_page(num_pages):
    ns = Namespace("m", num_layers=4, num_kv_heads=4, head_dim=64, dtype="bfloat16",
                   page_size=64)
    rng = np.random.default_rng(num_pages)
    tokens = rng.integers(0, 50_000, num_pages * ns.page_size).tolist()
    keys = ns.page_keys(tokens)
    token_bytes = [tokens_to_bytes(tokens[i * 64 : (i + 1) * 64]) for i in range(num_pages)]
    payloads = [rng.integers(0, 256, ns.page_nbytes, dtype=np.uint8).tobytes()
                for _ in range(num_pages)]
    blobs = [bytearray(encode_page(ns, k, t, p))
             for k, t, p in zip(keys, token_bytes, payloads, strict=True)]
    bad = num_pages // 2
    blobs[bad][-1] ^= 0x01  # flipped payload byte: that page alone fails
    out = decode_pages([bytes(b) for b in blobs], ns, keys, token_bytes)
    assert [o is None for o in out] == [i == bad for i in range(num_pages)]
    assert all(bytes(o) == p for o, p in zip(out, payloads, strict=True) if o is not None)


def test_chunked_tasks_yield_every_range_in_order():
    out = list(ChunkedTasks(lambda r: [2 * i for i in r], 100, 100 << 20, 3 << 20))
    assert len(out) == 34  # 3 indices per ~3 MB task
    assert [i for part, _ in out for i in part] == list(range(100))
    assert [v for _, values in out for v in values] == [2 * i for i in range(100)]
    # small work: one inline call
    assert list(ChunkedTasks(lambda r: list(r), 5, 1000, 1)) == [(range(5), [0, 1, 2, 3, 4])]
    assert list(ChunkedTasks(lambda r: list(r), 0, 1 << 30, 1)) == []


def test_chunked_tasks_start_at_once_and_close_leaves_none_running():
    """The caller may free what the tasks read right after closing: none may still run."""
    import threading
    import time

    lock = threading.Lock()
    running = [0]

    def slow(part: range) -> list[int]:
        with lock:
            running[0] += 1
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return list(part)

    started = threading.Event()
    tasks = ChunkedTasks(lambda part: started.set() or slow(part), 64, 64 << 20, 1 << 20)
    assert started.wait(5)  # running before anyone iterates
    with tasks:
        assert next(iter(tasks))[0] == range(1)
    assert running[0] == 0


def test_checksum_is_xxh3_64_and_can_run_without_the_gil():
    import xxhash

    from kvmesh.cachestore import codec

    assert codec._XXH3_64 is not None  # this xxhash build exports the C function
    rng = np.random.default_rng(3)
    for size in (0, 1, 1000, 64 << 10, (1 << 20) + 7):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        expected = xxhash.xxh3_64_intdigest(data.tobytes())
        assert codec.checksum(data.tobytes()) == expected
        assert codec.checksum(memoryview(data)) == expected
        if size:
            assert codec.checksum_at(data.ctypes.data, size) == expected
