"""argmax_rows vs torch.argmax: random rows of odd widths, and ties across chunks."""

from __future__ import annotations

import pytest
import torch
from paged_kv_data import DEVICE

from kvmesh.kernels import argmax_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), [(1, 1), (3, 5), (7, 4097), (33, 12_289)])
def test_matches_torch_argmax(rows, width, dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    x = (10 * torch.randn(rows, width, generator=gen)).to(dtype).to(DEVICE)
    out = argmax_rows(x)
    assert out.dtype == torch.int64 and out.shape == (rows,)
    assert torch.equal(out.cpu(), torch.argmax(x.float().cpu(), dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_first_index(dtype):
    """The maximum appears in several chunks (4096 columns each) and twice in one chunk."""
    x = torch.zeros(4, 9000, dtype=dtype)
    x[0, [8999, 4100, 5000]] = 3.0  # later chunks only
    x[1, [7, 8, 4095, 4096]] = 2.0  # first chunk, twice, and at a chunk boundary
    x[2, :] = -1.5  # every column ties
    x[3, 8999] = 1.0  # the very last column
    out = argmax_rows(x.to(DEVICE)).cpu()
    assert out.tolist() == [4100, 7, 0, 8999]
    assert torch.equal(out, torch.argmax(x.float(), dim=-1))


def test_strided_rows_and_out_buffer():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(6, 300, generator=gen).to(DEVICE)
    x = base[::2, 10:290]  # row stride 600, unit column stride
    out = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    assert argmax_rows(x, out=out) is out
    assert torch.equal(out.cpu(), torch.argmax(x.cpu(), dim=-1))


def test_bad_input():
    with pytest.raises(ValueError):
        argmax_rows(torch.zeros(3, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError):
        argmax_rows(torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError):
        argmax_rows(torch.zeros(2, 0, device=DEVICE))
