"""Staging encoded pages into one host tensor (checked, copied, checksummed on the copy) and
uploading staged rows into pool pages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.workers.offload.kv_upload import PageStager
from kvmesh.workers.offload.staged_rows import RowChecks, StagedPages
from kvmesh.workers.runner.kv_pool import PoolPages
from kvmesh.workers.runner.pool_copies import (
    ArrivingRows,
    HostCopySlots,
    arriving_loads,
    layer_runs,
    upload_layers,
    upload_pages,
)

NS = Namespace("m", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", page_size=4)
SHAPE = (3, 2, 4, 2, 8)


def stage_pages(blobs, ns, keys, tokens, pages_per_chunk=None, is_pinned=False,
                device_checksums=False):
    """is_pinned: the in-place path (checksum the source, copy straight to the output).
    device_checksums: verify the copied rows with the kernels.xxh3 kernel (Triton's interpreter
    on this CPU, else on CUDA), as the CUDA engine does, instead of the pool's checksums in
    host memory."""
    device = torch.device("cuda" if device_checksums and torch.cuda.is_available() else "cpu")
    stager = PageStager(SHAPE, torch.float32, device, device_checksums=device_checksums)
    if pages_per_chunk is not None:
        stager.pages_per_chunk = pages_per_chunk
    return verified_rows(stager, blobs, ns, keys, tokens, is_pinned=is_pinned)


def verified_rows(stager, blobs, ns, keys, tokens, **kwargs):
    """The staged rows that passed their checksums (waited for)."""
    staged = stager.stage_unverified(blobs, ns, keys, tokens, **kwargs)
    return staged.rows[: staged.verify()]


def pages(num: int, seed: int = 0):
    """(blobs, keys, token bytes, payload tensors) of `num` pages of one sequence."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (num * 4,), generator=g).tolist()
    keys = NS.page_keys(tokens)
    token_bytes = [tokens_to_bytes(tokens[i * 4 : (i + 1) * 4]) for i in range(num)]
    payloads = [torch.randn(SHAPE, generator=g) for _ in range(num)]
    blobs = [encode_page(NS, k, t, p.numpy().tobytes())
             for k, t, p in zip(keys, token_bytes, payloads, strict=True)]
    return blobs, keys, token_bytes, payloads


@pytest.mark.parametrize("is_pinned", [False, True])
@pytest.mark.parametrize(("num", "per_chunk"), [(1, None), (5, 2), (6000, None)])
def test_stage_copies_every_verified_page(num, per_chunk, is_pinned):
    """6000 pages (9 MB) go to the thread pool; 2 pages per chunk alternate the buffers."""
    blobs, keys, tokens, payloads = pages(num)
    staged = stage_pages(blobs, NS, keys, tokens, per_chunk, is_pinned)
    assert staged.shape == (num, *SHAPE)
    assert torch.equal(staged, torch.stack(payloads))


@pytest.mark.parametrize("is_pinned", [False, True])
@pytest.mark.parametrize(("num", "per_chunk"), [(1, None), (5, 2)])
def test_stage_with_device_checksums(num, per_chunk, is_pinned):
    blobs, keys, tokens, payloads = pages(num)
    staged = stage_pages(blobs, NS, keys, tokens, per_chunk, is_pinned, device_checksums=True)
    assert torch.equal(staged.cpu(), torch.stack(payloads))


@pytest.mark.parametrize("device_checksums", [False, True])
@pytest.mark.parametrize("is_pinned", [False, True])
def test_a_bad_page_ends_the_staged_prefix(is_pinned, device_checksums):
    blobs, keys, tokens, payloads = pages(6)
    corrupt = bytearray(blobs[3])
    corrupt[-1] ^= 1  # payload byte: only the checksum can catch it
    blobs[3] = bytes(corrupt)
    for per_chunk in (None, 2):
        staged = stage_pages(blobs, NS, keys, tokens, per_chunk, is_pinned, device_checksums)
        assert torch.equal(staged.cpu(), torch.stack(payloads[:3]))
    blobs, keys, tokens, _ = pages(6)
    tokens[2] = tokens_to_bytes([1, 2, 3, 4])  # a hash collision: same key, other tokens
    assert len(stage_pages(blobs, NS, keys, tokens)) == 2
    other = Namespace("other", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32",
                      page_size=4)
    assert len(stage_pages(blobs, other, keys, tokens)) == 0


@pytest.mark.parametrize("bad", ["header", "checksum", "tokens", "short", "none"])
@pytest.mark.parametrize("given_addresses", [False, True])
def test_device_checksums_stop_at_the_first_bad_page(bad, given_addresses):
    """Pinned pages with device checksums: every copy is queued before any header is checked;
    a bad header (or a hash collision, or a page of the wrong size) found afterwards still ends
    the prefix there, and a bad payload is caught by the checksums. The caller may say where
    each page lies instead of the stager asking the buffers."""
    blobs, keys, tokens, payloads = pages(7)
    if bad in ("header", "checksum"):
        corrupt = bytearray(blobs[5])
        corrupt[0 if bad == "header" else -1] ^= 1
        blobs[5] = bytes(corrupt)
    elif bad == "tokens":
        tokens[5] = tokens_to_bytes([1, 2, 3, 4])
    elif bad == "short":
        blobs[5] = blobs[5][:-8]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stager = PageStager(SHAPE, torch.float32, device, device_checksums=True)
    arrays = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    views = [memoryview(a.numpy()).toreadonly() for a in arrays]
    addresses = [a.data_ptr() for a in arrays] if given_addresses else None
    staged = verified_rows(stager, views, NS, keys, tokens, is_pinned=True,
                           addresses=addresses)
    want = 7 if bad == "none" else 5
    assert torch.equal(staged.cpu(), torch.stack(payloads[:want]))
    other = Namespace("other", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32",
                      page_size=4)
    assert len(verified_rows(stager, views, other, keys, tokens, is_pinned=True)) == 0


def test_host_checksums_need_no_triton():
    """A CPU worker stages pages with Triton absent (it is a test extra): device checksums are
    off there and nothing imports kernels.xxh3."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["triton"] = None  # import triton now fails
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import torch
        from test_kv_upload import NS, pages, stage_pages
        blobs, keys, tokens, payloads = pages(3)
        for pinned in (False, True):
            staged = stage_pages(blobs, NS, keys, tokens, is_pinned=pinned)
            assert torch.equal(staged, torch.stack(payloads))
        assert "kvmesh.kernels.xxh3" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_in_place_send_stops_at_a_bad_page_in_a_later_task():
    """6000 pages go out in ~4 MB hashing tasks; a corrupt page in the second task ends the
    prefix there, after the pages before it were copied."""
    blobs, keys, tokens, payloads = pages(6000)
    corrupt = bytearray(blobs[4321])
    corrupt[-5] ^= 0x10
    blobs[4321] = bytes(corrupt)
    staged = stage_pages(blobs, NS, keys, tokens, is_pinned=True)
    assert staged.shape[0] == 4321
    assert torch.equal(staged, torch.stack(payloads[:4321]))


def test_upload_merges_consecutive_runs_and_keeps_order():
    blobs, keys, tokens, payloads = pages(7)
    staged = stage_pages(blobs, NS, keys, tokens)
    pool = torch.zeros((12, *SHAPE))
    page_ids = [4, 5, 6, 1, 9, 10, 2]  # runs 4-6, 1, 9-10, 2
    upload_pages(pool, page_ids, [(staged, i) for i in range(len(staged))])
    for page_id, payload in zip(page_ids, payloads, strict=True):
        assert torch.equal(pool[page_id], payload)
    untouched = set(range(12)) - set(page_ids)
    assert all(not pool[i].any() for i in untouched)


def test_upload_scatters_rows_of_two_sources():
    """Six rows of `a` in reverse order go to scattered pages (one gather + index_copy_), the
    three rows of `b` to pages 14-16 (one copy)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, *SHAPE, generator=gen), torch.randn(3, *SHAPE, generator=gen)
    pool = torch.zeros((20, *SHAPE))
    page_ids = [3, 5, 7, 9, 11, 13, 14, 15, 16]
    rows = [(a, i) for i in (5, 4, 3, 2, 1, 0)] + [(b, 0), (b, 1), (b, 2)]
    upload_pages(pool, page_ids, rows)
    for page_id, (source, row) in zip(page_ids, rows, strict=True):
        assert torch.equal(pool[page_id], source[row])
    assert all(not pool[i].any() for i in set(range(20)) - set(page_ids))


def test_host_copy_slots_hand_out_consecutive_rows_and_take_them_back():
    slots = HostCopySlots(SHAPE, torch.float32, 5 * 3 * 2 * 4 * 2 * 8 * 4, pin_memory=False)
    assert slots.count == 5
    assert slots.take(3) == [0, 1, 2]  # waits for the (background) allocation
    assert slots.take(4) == [3, 4]  # only two left
    assert slots.take(1) == []
    slots.give_back([1, 4])
    assert sorted(slots.take(5)) == [1, 4] and slots.num_free == 0


@pytest.fixture(scope="module")
def tiny_runner():
    """A real ModelRunner of the tiny random Llama on CPU (8 KiB pages), its pool randomized."""
    from tiny_models import build

    from kvmesh.workers.config import WorkerConfig
    from kvmesh.workers.runner.model_runner import ModelRunner

    _, loaded = build()
    runner = ModelRunner(WorkerConfig(model="tiny", device="cpu", dtype="float32",
                                      kv_cache_bytes=10 * 8192), loaded, 256)
    runner.kv_pool.copy_(torch.randn(runner.kv_pool.shape))
    return runner


def test_host_copies_copy_runs_of_pages_into_slots(tiny_runner):
    """Pages 5-7 go to slots 0-2 in one copy, page 2 to slot 3; the fifth page finds no slot."""
    runner, pool = tiny_runner, tiny_runner.kv_pool
    pages: PoolPages = runner.pages
    assert runner.num_pages == 10 and pages.kv_pool is pool
    pages.host_slots = HostCopySlots(runner.page_shape, torch.float32, 4 * runner.page_nbytes,
                                     pin_memory=False)
    try:
        rows, taken, event = pages.copy_to_host([5, 6, 7, 2, 9])
        assert taken == [0, 1, 2, 3] and event is None and len(rows) == 4
        for row, page in zip(rows, [5, 6, 7, 2], strict=True):
            assert torch.equal(row, pool[page])
        before = [row.clone() for row in rows]
        pool.add_(1.0)  # the host rows are copies
        assert all(torch.equal(row, old) for row, old in zip(rows, before, strict=True))
        pages.release_host_copies(taken)
        assert pages.host_slots.num_free == 4
    finally:
        pages.host_slots = None


def test_without_an_arena_host_copies_come_back_empty(tiny_runner):
    """The slot arena could not be allocated: copy_to_host hands out nothing (the offload
    then counts the pages as dropped) instead of failing the engine step."""
    slots = HostCopySlots(tiny_runner.page_shape, torch.float32, 1 << 62, pin_memory=False)
    tiny_runner.pages.host_slots = slots  # cannot allocate
    try:
        assert tiny_runner.pages.copy_to_host([0, 1]) == ([], [], None)
        assert slots.rows is None and slots.num_free == 0
    finally:
        tiny_runner.pages.host_slots = None


@pytest.mark.parametrize(("num_layers", "count", "expected"), [
    (16, 4, [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]),
    (3, 4, [range(0, 1), range(1, 2), range(2, 3)]),
    (7, 3, [range(0, 2), range(2, 4), range(4, 7)]),
    (1, 4, [range(0, 1)]),
])
def test_layer_runs_cover_every_layer_once_in_order(num_layers, count, expected):
    assert layer_runs(num_layers, count) == expected


def test_checks_queued_late_run_once_and_a_failure_to_queue_them_drops_every_row(caplog):
    rows = torch.zeros((3, *SHAPE))
    calls = []

    class CountingChecks(RowChecks):
        def verify(self, rows, recorded, sources=None, after=None):
            calls.append(recorded)
            return StagedPages(rows, 2)

    staged = StagedPages.deferred(rows, CountingChecks(torch.device("cpu")), [1, 2, 3], None,
                                  None)
    staged.start_checks()
    assert staged.verify() == 2 and calls == [[1, 2, 3]]  # verify() does not queue them again
    stager = PageStager(SHAPE, torch.float32, torch.device("cpu"), device_checksums=True)

    def failing(*args, **kwargs):
        raise RuntimeError("no device memory")

    stager.checks.verify = failing
    staged = StagedPages.deferred(rows, stager.checks, [1, 2, 3], None, None)
    assert staged.verify() == 0  # none kept, and waiting goes on (leases end)
    assert "they are dropped" in caplog.text


def test_arriving_loads_are_used_in_layer_runs_only_in_row_order():
    runs = [range(0, 1), range(1, 3)]
    a = ArrivingRows(torch.zeros((3, 4)), [], runs)
    b = ArrivingRows(torch.zeros((2, 4)), [], runs)
    plain = torch.zeros((2, 4))
    loads = [(7, (a, 0)), (3, (a, 1)), (9, (plain, 0)), (4, (b, 0)), (5, (b, 1)), (1, (a, 2))]
    assert arriving_loads(loads, runs) == [(a, [7, 3, 1]), (b, [4, 5])]
    assert arriving_loads([(7, (a, 1)), (3, (a, 0))], runs) == []  # out of order
    assert arriving_loads([(7, (a, 0))], [range(0, 3)]) == []  # other layer runs
    assert arriving_loads([(9, (plain, 0))], runs) == []


@pytest.mark.gpu
def test_pinned_pages_arrive_a_layer_run_at_a_time():
    """A send checked on the device copies on a stream of its own, one layer run of every page
    at a time, with an event per run: each run can be moved into the pool as soon as it is in,
    and the pool ends up as if the pages had been copied whole."""
    blobs, keys, tokens, payloads = pages(9)
    pinned = [torch.frombuffer(bytearray(b), dtype=torch.uint8).pin_memory() for b in blobs]
    views = [memoryview(t.numpy()) for t in pinned]
    stager = PageStager(SHAPE, torch.float32, torch.device("cuda"), device_checksums=True)
    assert len(stager.layer_runs) == 3  # one per layer of SHAPE
    stager.checks.copy_stream = torch.cuda.Stream()

    def stage_late():
        """Staged behind ~0.1 s of sleep on the copy stream: reading too early gets garbage."""
        with torch.cuda.stream(stager.checks.copy_stream):
            torch.cuda._sleep(200_000_000)
        staged = stager.stage_unverified(views, NS, keys, tokens, is_pinned=True)
        assert isinstance(staged.arriving, ArrivingRows) and staged.arriving.rows is staged.rows
        return staged

    staged = stage_late()
    source = staged.arriving
    pool = torch.zeros((12, *SHAPE), device="cuda")
    ids = [11, 2, 5, 7, 0, 3, 9, 1, 4]
    index = torch.tensor(ids, device="cuda")
    for run in range(len(source.layer_runs)):
        upload_layers(pool, index, source, run)
    torch.cuda.current_stream().synchronize()
    for page_id, payload in zip(ids, payloads, strict=True):
        assert torch.equal(pool[page_id].cpu(), payload)
    assert staged.verify() == 9
    again = torch.zeros_like(pool)
    late = stage_late()
    upload_pages(again, ids, [(late.arriving, i) for i in range(9)])  # waits for all of it
    torch.cuda.current_stream().synchronize()
    assert torch.equal(again, pool)
    assert late.verify() == 9
