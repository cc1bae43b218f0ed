"""XXH3-64 (xxhash 0.8, seed 0, default secret) of every row of a tensor, on the device.

A page's checksum is xxh3_64 of its payload (ARCHITECTURE: page payload). A prefix hit from the
host tier or the store copies hundreds of MB to the GPU; hashing them there after the copy reads
them from HBM instead of a second time from host memory (~31 GB/s on the H200 host, where the CPU
checksum of an 8K-token 1B prefix alone took 8 ms).

XXH3's long-input loop keeps 8 independent 64-bit lanes. Within a 1 KiB block (16 stripes of
64 bytes) every stripe adds its terms to the lanes, so a block's contribution is a sum that any
number of threads can compute; only the per-block scramble between blocks is sequential. Hence
two launches: one program per (row, run of blocks) sums its blocks' contributions; then one
program per row folds the sums in order (scramble, last partial block, last stripe, merge,
avalanche). Unsigned 64-bit arithmetic wraps, as in the C code. Rows must hold a multiple of 8
bytes and more than 240 (the long-input path; pages are far larger).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
_PRIME32 = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)
_PRIME64 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
            0x27D4EB2F165667C5)
_AVALANCHE = 0x165667919E3779F9
_STRIPE_WORDS = 8  # 64-byte stripe, one word per lane
_BLOCK_STRIPES = 16  # (secret size 192 - stripe 64) / 8 bytes consumed per stripe
_BLOCK_WORDS = _STRIPE_WORDS * _BLOCK_STRIPES
MIN_NBYTES = 241

# offsets (in words) of each table in the constants tensor
_KEYS, _SCRAMBLE, _LAST, _MERGE, _INIT, _SCALARS = 0, 128, 136, 144, 152, 160
_NUM_CONSTS = 163  # scalars: PRIME32_1, the avalanche prime, PRIME64_1


def _word(offset: int) -> int:
    return struct.unpack_from("<Q", _SECRET, offset)[0]


def _constants() -> list[int]:
    keys = [_word(8 * (s + i)) for s in range(_BLOCK_STRIPES) for i in range(_STRIPE_WORDS)]
    scramble = [_word(128 + 8 * i) for i in range(8)]
    last = [_word(192 - 64 - 7 + 8 * i) for i in range(8)]
    merge = [_word(11 + 8 * i) for i in range(8)]
    init = [_PRIME32[2], _PRIME64[0], _PRIME64[1], _PRIME64[2], _PRIME64[3], _PRIME32[1],
            _PRIME64[4], _PRIME32[0]]
    values = keys + scramble + last + merge + init + [_PRIME32[0], _AVALANCHE, _PRIME64[0]]
    assert len(values) == _NUM_CONSTS
    return [as_int64(v) for v in values]


_CONSTANTS: dict[torch.device, torch.Tensor] = {}


def _constants_on(device: torch.device) -> torch.Tensor:
    if device not in _CONSTANTS:
        _CONSTANTS[device] = torch.tensor(_constants(), dtype=torch.int64, device=device)
    return _CONSTANTS[device]


@triton.jit
def _u64(ptr, offs):
    return tl.load(ptr + offs).to(tl.uint64, bitcast=True)


@triton.jit
def _block_sums_kernel(words_ptr, sums_ptr, consts_ptr, stride_row, num_blocks, last_stripes,
                       BLOCKS: tl.constexpr):
    """sums[row, b, lane] = block b's addition to the lane (b == num_blocks: the last, partial
    block of `last_stripes` stripes)."""
    row = tl.program_id(0).to(tl.int64)
    blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    j = tl.arange(0, 128)  # word in the block: stripe j // 8, lane j % 8
    valid = (blocks[:, None] < num_blocks) | (
        (blocks[:, None] == num_blocks) & (j[None, :] // 8 < last_stripes))
    base = words_ptr + row * stride_row + blocks[:, None].to(tl.int64) * 128
    w = tl.load(base + j[None, :], mask=valid, other=0).to(tl.uint64, bitcast=True)
    w_swapped = tl.load(base + (j ^ 1)[None, :], mask=valid, other=0).to(tl.uint64, bitcast=True)
    k = w ^ _u64(consts_ptr, j)[None, :]
    term = (k & 0xFFFFFFFF) * (k >> 32) + w_swapped
    term = tl.where(valid, term, 0)
    sums = tl.sum(tl.reshape(term, (BLOCKS, 16, 8)), axis=1)
    lanes = tl.arange(0, 8)
    out = sums_ptr + (row * (num_blocks + 1) + blocks[:, None]) * 8 + lanes[None, :]
    tl.store(out, sums.to(tl.int64, bitcast=True), mask=blocks[:, None] <= num_blocks)


@triton.jit
def _mul_fold(a, b):
    """(a * b as 128 bits): low 64 bits xor high 64 bits."""
    a_lo, a_hi = a & 0xFFFFFFFF, a >> 32
    b_lo, b_hi = b & 0xFFFFFFFF, b >> 32
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 32) + (lh & 0xFFFFFFFF) + (hl & 0xFFFFFFFF)
    hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32)
    return (a * b) ^ hi


@triton.jit
def _finish_kernel(words_ptr, sums_ptr, consts_ptr, out_ptr, stride_row, num_words, num_blocks):
    row = tl.program_id(0).to(tl.int64)
    pair = tl.arange(0, 4)[:, None]
    half = tl.arange(0, 2)[None, :]
    lane = pair * 2 + half  # the 8 lanes as [4, 2]: merge multiplies lane 2k by lane 2k+1
    acc = _u64(consts_ptr, 152 + lane)
    scramble = _u64(consts_ptr, 128 + lane)
    prime = _u64(consts_ptr, 160)
    sums = sums_ptr + row * (num_blocks + 1) * 8
    for b in range(num_blocks):
        acc += _u64(sums, b * 8 + lane)
        acc ^= acc >> 47
        acc ^= scramble
        acc *= prime
    acc += _u64(sums, num_blocks * 8 + lane)
    # the last stripe: the row's final 64 bytes
    last = words_ptr + row * stride_row + num_words - 8
    w = _u64(last, lane)
    k = w ^ _u64(consts_ptr, 136 + lane)
    acc += (k & 0xFFFFFFFF) * (k >> 32) + _u64(last, lane ^ 1)
    m = acc ^ _u64(consts_ptr, 144 + lane)
    lo = tl.sum(tl.where(half == 0, m, 0), axis=1)
    hi = tl.sum(tl.where(half == 1, m, 0), axis=1)
    length = num_words.to(tl.uint64) * 8
    h = tl.sum(_mul_fold(lo, hi), axis=0) + length * _u64(consts_ptr, 162)
    h ^= h >> 37
    h *= _u64(consts_ptr, 161)
    h ^= h >> 32
    tl.store(out_ptr + row, h.to(tl.int64, bitcast=True))


def xxh3_64_rows(rows: torch.Tensor) -> torch.Tensor:
    """xxhash.xxh3_64_intdigest of each row's bytes, as int64 [rows] (the unsigned value's bit
    pattern: compare with `as_int64`). `rows` is [n, ...], each row contiguous, of any dtype;
    a row holds a multiple of 8 bytes and at least MIN_NBYTES."""
    if rows.dim() < 1:
        raise ValueError("rows must have a leading row dimension")
    n = rows.shape[0]
    nbytes = math.prod(rows.shape[1:]) * rows.element_size()
    if nbytes % 8 or nbytes < MIN_NBYTES:
        raise ValueError(f"rows must hold a multiple of 8 bytes, at least {MIN_NBYTES}; "
                         f"got {nbytes}")
    out = torch.empty(n, dtype=torch.int64, device=rows.device)
    if n == 0:
        return out
    flat = rows.reshape(n, -1)
    if flat.stride(-1) != 1:
        raise ValueError("each row must be contiguous")
    size = flat.element_size()
    if (flat.storage_offset() * size) % 8 or (flat.stride(0) * size) % 8:
        raise ValueError("rows must start at multiples of 8 bytes")
    words = flat.view(torch.uint8).view(torch.int64)
    num_words = nbytes // 8
    num_blocks = (nbytes - 1) // (8 * _BLOCK_WORDS)  # full blocks before the last (partial) one
    last_stripes = ((nbytes - 1) - num_blocks * 8 * _BLOCK_WORDS) // 64
    consts = _constants_on(rows.device)
    sums = torch.empty((n, num_blocks + 1, 8), dtype=torch.int64, device=rows.device)
    blocks_per_program = 8
    grid = (n, triton.cdiv(num_blocks + 1, blocks_per_program))
    _block_sums_kernel[grid](words, sums, consts, words.stride(0), num_blocks, last_stripes,
                             BLOCKS=blocks_per_program, num_warps=4)
    _finish_kernel[(n,)](words, sums, consts, out, words.stride(0), num_words, num_blocks,
                         num_warps=1)
    return out


def as_int64(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value
