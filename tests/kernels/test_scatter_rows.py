"""scatter_rows vs index_copy_: random rows of odd shapes and every dtype, pages in any order."""

from __future__ import annotations

import pytest
import torch
from paged_kv_data import DEVICE

from kvmesh.kernels.scatter_rows import scatter_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8]


def random_rows(shape, dtype, gen):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_dst", "num_src", "row_shape"),
                         [(1, 1, (3,)), (7, 5, (2, 3, 5)), (40, 17, (3, 2, 4, 2, 8)),
                          (9, 9, (8193,)), (30, 11, (2, 4111))])
def test_matches_index_copy(num_dst, num_src, row_shape, dtype):
    gen = torch.Generator().manual_seed(num_dst * 100 + num_src)
    dst = random_rows((num_dst, *row_shape), dtype, gen)
    src = random_rows((num_src, *row_shape), dtype, gen)
    index = torch.randperm(num_dst, generator=gen)[:num_src]
    want = dst.clone().index_copy_(0, index, src)
    dst, src = dst.to(DEVICE), src.to(DEVICE)
    scatter_rows(dst, index.to(DEVICE), src)
    assert torch.equal(dst.cpu(), want)  # a copy: bit for bit


def test_rows_of_odd_byte_sizes_and_no_rows():
    """A row whose size is no multiple of 4 bytes moves in its own dtype; no rows is a no-op."""
    dst = torch.zeros(5, 3, dtype=torch.uint8, device=DEVICE)
    src = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8, device=DEVICE)
    scatter_rows(dst, torch.tensor([4, 0]), src)
    assert dst.cpu().tolist() == [[4, 5, 6], [0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 2, 3]]
    scatter_rows(dst, torch.tensor([], dtype=torch.int64), src[:0])
    assert dst.cpu()[4].tolist() == [1, 2, 3]


def test_bad_arguments_are_refused():
    dst = torch.zeros(4, 8, device=DEVICE)
    src = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rows differ"):
        scatter_rows(dst, torch.tensor([0, 1]), src.half())
    with pytest.raises(ValueError, match="rows differ"):
        scatter_rows(dst, torch.tensor([0, 1]), torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        scatter_rows(dst, torch.tensor([0, 1]), torch.zeros(8, 2, device=DEVICE).T)
    with pytest.raises(ValueError, match="index"):
        scatter_rows(dst, torch.tensor([0]), src)
    with pytest.raises(ValueError, match="index"):
        scatter_rows(dst, torch.tensor([0.0, 1.0]), src)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_layer_of_every_page(dtype):
    """scatter_row_spans: one layer's span of each staged page into the same span of its pool
    page (rows strided by a whole page), other layers untouched."""
    from kvmesh.kernels.scatter_rows import scatter_row_spans

    gen = torch.Generator().manual_seed(7)
    layers, layer_elems = 3, 37
    pool = random_rows((11, layers, layer_elems), dtype, gen)
    staged = random_rows((4, layers, layer_elems), dtype, gen)
    ids = torch.tensor([9, 2, 5, 0])
    want = pool.clone()
    want[ids, 1] = staged[:, 1]
    pool, staged = pool.to(DEVICE), staged.to(DEVICE)
    span = slice(layer_elems, 2 * layer_elems)
    scatter_row_spans(pool.view(11, -1)[:, span], ids.to(DEVICE), staged.view(4, -1)[:, span])
    assert torch.equal(pool.cpu(), want)
