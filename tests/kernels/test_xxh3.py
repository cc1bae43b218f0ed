"""xxh3_64_rows against python-xxhash (the page checksum's own implementation): random rows of
odd lengths (partial last blocks, one-stripe tails, exact block multiples), any dtype, rows
strided inside a larger tensor, and the inputs it refuses."""

from __future__ import annotations

import ctypes

import pytest
import torch
import xxhash
from paged_kv_data import DEVICE

from kvmesh.kernels.xxh3 import _SECRET, MIN_NBYTES, as_int64, xxh3_64_rows


def expected(rows: torch.Tensor) -> list[int]:
    return [as_int64(xxhash.xxh3_64_intdigest(r.cpu().contiguous().view(torch.uint8).numpy()
                                              .tobytes())) for r in rows]


def random_words(rows: int, words: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (rows, words), generator=gen, dtype=torch.int64)


@pytest.mark.parametrize("nbytes", [248, 1024, 1032, 1088, 2040, 4096, 12_344, 65_536 + 8,
                                    3 * 8192 - 64])
def test_matches_xxhash_on_random_rows(nbytes):
    rows = random_words(3, nbytes // 8, nbytes).to(DEVICE)
    out = xxh3_64_rows(rows)
    assert out.dtype == torch.int64 and out.shape == (3,)
    assert out.cpu().tolist() == expected(rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_rows_of_any_dtype_and_shape(dtype):
    """Pages as the pool holds them: [n, layers, 2, page_size, heads, head_dim]."""
    gen = torch.Generator().manual_seed(7)
    pages = (100 * torch.randn(5, 3, 2, 4, 2, 24, generator=gen)).to(dtype).to(DEVICE)
    assert xxh3_64_rows(pages).cpu().tolist() == expected(pages)


def test_strided_rows_and_a_single_flipped_bit():
    pool = random_words(9, 640, 3).to(DEVICE)
    every_other = pool[::2]
    assert xxh3_64_rows(every_other).cpu().tolist() == expected(every_other)
    before = xxh3_64_rows(pool).cpu()
    pool[4, 333] ^= 1 << 40
    after = xxh3_64_rows(pool).cpu()
    assert (before != after).tolist() == [i == 4 for i in range(9)]
    assert after.tolist() == expected(pool)


def test_no_rows():
    assert xxh3_64_rows(torch.empty(0, 64, dtype=torch.int64, device=DEVICE)).shape == (0,)


@pytest.mark.parametrize("shape", [(2, 30), (2, 61, 4)])  # 240 bytes; 244 bytes, not 8 | n
def test_refuses_short_or_unaligned_rows(shape):
    with pytest.raises(ValueError, match="multiple of 8 bytes"):
        xxh3_64_rows(torch.zeros(shape, dtype=torch.int64 if len(shape) == 2 else torch.uint8,
                                 device=DEVICE))


def test_refuses_rows_that_are_not_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        xxh3_64_rows(torch.zeros(2, 64, 2, dtype=torch.int64, device=DEVICE)[:, :, 0])


def test_refuses_rows_at_unaligned_offsets():
    rows = torch.zeros(2, 300, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="multiples of 8 bytes"):
        xxh3_64_rows(rows[:, 4:252])  # 248 bytes a row, but starting 4 bytes in


def test_the_secret_is_xxhash_default():
    """xxhash derives the seed-0 secret as its default one (XXH3_generateSecret_fromSeed)."""
    lib = ctypes.CDLL(xxhash._xxhash.__file__)
    buf = ctypes.create_string_buffer(192)
    lib.XXH3_generateSecret_fromSeed.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.XXH3_generateSecret_fromSeed(buf, 0)
    assert buf.raw == _SECRET
    assert MIN_NBYTES == 241
