"""KvOffload's demotion of evicted device pages into the host tier, and its host-tier matches
(in chunks, so the first pages' copies start while the rest are looked up)."""

from __future__ import annotations

import pytest
import torch

import kvmesh.workers.offload.tier_lookup
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.workers.engine.block_manager import EvictedPage
from kvmesh.workers.engine.sampling_params import SamplingParams
from kvmesh.workers.engine.sequence import Sequence
from kvmesh.workers.offload.host_offload import KvOffload
from kvmesh.workers.offload.kv_upload import PageStager
from kvmesh.workers.runner.pool_copies import ArrivingRows

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", page_size=2)
# pages of 256 bytes: large enough for the device checksum kernel
LOOKUP_NS = Namespace("m", num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", page_size=2)
LOOKUP_SHAPE = (2, 2, 2, 1, 8)


class FakePool:
    """The device pool as a connector reads it: every page holds `payload`; no host copies."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def read_page(self, page_id: int) -> memoryview:
        return memoryview(self.payload)

    def copy_to_host(self, page_ids):
        return [], None, None

    def release_host_copies(self, slots) -> None:
        pass


def test_a_demoted_prefix_is_stored_in_order_and_evicted_from_its_end():
    """Pages come shallowest first: stored in that order (consecutive slots), but the deepest
    page is the least recently used, so the host tier drops a prefix's tail before its head."""
    tokens = list(range(8))
    keys = NS.page_keys(tokens)
    payload = bytes(NS.page_nbytes)
    page_nbytes = len(payload) + 100  # room for 3 encoded pages, not 4
    stager = PageStager((1, 2, 2, 1, 8), torch.float32, torch.device("cpu"))
    offload = KvOffload(FakePool(payload), 3 * page_nbytes, stager)
    pages = [EvictedPage(i, keys[i], keys[i - 1] if i else None, tuple(tokens[2 * i:2 * i + 2]),
                         NS) for i in range(3)]
    offload.on_evict(pages)
    assert offload.cached_keys() == [keys[2], keys[1], keys[0]]  # least recently used first
    offload.on_evict([EvictedPage(3, keys[3], keys[2], (6, 7), NS)])
    assert set(offload.cached_keys()) == {keys[0], keys[1], keys[3]}  # the tail page went
    assert [e.kind for e in offload.pop_events()] == ["stored"] * 3 + ["stored", "removed"]


def staged_rows(source) -> torch.Tensor:
    """A payload's tensor (on CUDA rows arrive a layer run at a time: waited for, they are in)."""
    return source.rows if isinstance(source, ArrivingRows) else source


def host_pages(num: int, missing: int | None = None, corrupt: int | None = None,
               device_checksums: bool = False, bad_header: int | None = None):
    """A KvOffload whose host tier holds `num` pages of one sequence (but `missing`; `corrupt`
    with a payload byte flipped, `bad_header` recording another page's token ids), the
    sequence, and each page's payload. device_checksums: on
    CUDA where there is one (the host tier then pins its pages), else on this CPU."""
    g = torch.Generator().manual_seed(num)
    tokens = torch.randint(0, 1000, (2 * num + 1,), generator=g).tolist()
    keys = LOOKUP_NS.page_keys(tokens)
    payloads = [torch.randn(LOOKUP_SHAPE, generator=g) for _ in range(num)]
    on_cuda = device_checksums and torch.cuda.is_available()
    stager = PageStager(LOOKUP_SHAPE, torch.float32, torch.device("cuda" if on_cuda else "cpu"),
                        device_checksums=device_checksums)
    offload = KvOffload(FakePool(b""), 64 * (LOOKUP_NS.page_nbytes + 100), stager)
    for i in range(num):
        j = i + 1 if i == bad_header else i
        blob = bytearray(encode_page(LOOKUP_NS, keys[i],
                                     tokens_to_bytes(tokens[2 * j : 2 * j + 2]),
                                     payloads[i].numpy().tobytes()))
        if i == corrupt:
            blob[-3] ^= 0x40  # a payload byte: only the checksum catches it
        if i != missing:
            assert not offload.host.put_many([(keys[i], bytes(blob))])
    seq = Sequence("r", 0, tokens, len(tokens), SamplingParams(), LOOKUP_NS)
    return offload, seq, keys, payloads


@pytest.mark.parametrize(("missing", "corrupt", "bad_header", "num_ok", "chunks"), [
    (None, None, None, 7, [2, 2, 3]),  # chunks of 2, 2, then as many as came before
    (5, None, None, 5, [2, 2, 1]),  # a gap ends the lookup (no store here)
    (None, 5, None, 5, [2, 2, 3]),  # a bad page in the last chunk: the pages before it stay
    (None, 1, None, 1, [2, 2, 3]),  # ... in the first one: found after the copies, all go
    (None, None, 3, 3, [2, 2]),  # a bad header: found before the next chunk is looked up
])
def test_host_lookups_checked_on_the_device_go_in_growing_chunks(
        monkeypatch, missing, corrupt, bad_header, num_ok, chunks):
    """Checksums on the device (kernels.xxh3; Triton's interpreter on a CPU): the first
    chunk's copies are queued before the next chunk is looked up; one checksum pass at the end.
    """
    monkeypatch.setattr(kvmesh.workers.offload.tier_lookup, "_FIRST_CHUNK_PAGES", 2)
    offload, seq, keys, payloads = host_pages(7, missing, corrupt, device_checksums=True,
                                              bad_header=bad_header)
    looked_up = []
    get = offload.host.get_leading_addressed
    offload.host.get_leading_addressed = lambda k: looked_up.append(len(k)) or get(k)
    load = offload.match(seq, 0, 7)
    assert load is not None and load.start_page == 0
    rows = staged_rows(load.rows[0][0])
    held = 7 if missing is None else missing  # device rows for the pages held, no more
    assert rows.untyped_storage().nbytes() == held * rows[0].numel() * rows.element_size()
    assert load.wait() == num_ok
    assert looked_up == chunks
    for i, (rows, row) in enumerate(load.rows):
        assert torch.equal(staged_rows(rows)[row].cpu(), payloads[i])
    assert load.tiers == ["cpu"] * num_ok
    bad = corrupt if corrupt is not None else bad_header
    if missing is not None:  # the count of held pages ends the chunks at the gap
        assert looked_up[-1] == missing - sum(looked_up[:-1])
    if bad is not None:  # dropped from the host tier; the others stay
        assert offload.host.contains_many(keys[:7]) == [i != bad for i in range(7)]


@pytest.mark.parametrize(("corrupt", "num_ok"), [(None, 7), (5, 5)])
def test_host_lookups_checked_on_the_host_go_in_one(monkeypatch, corrupt, num_ok):
    """Checksums on the host: a send waits for the one before it, so chunks would not overlap."""
    monkeypatch.setattr(kvmesh.workers.offload.tier_lookup, "_FIRST_CHUNK_PAGES", 2)
    offload, seq, keys, payloads = host_pages(7, corrupt=corrupt, device_checksums=False)
    looked_up = []
    get = offload.host.get_leading_addressed
    offload.host.get_leading_addressed = lambda k: looked_up.append(len(k)) or get(k)
    load = offload.match(seq, 0, 7)
    assert load is not None and load.wait() == num_ok and looked_up == [7]
    for i, (rows, row) in enumerate(load.rows):
        assert torch.equal(staged_rows(rows)[row].cpu(), payloads[i])


def test_a_lookup_past_the_device_prefix_starts_at_its_first_page(monkeypatch):
    monkeypatch.setattr(kvmesh.workers.offload.tier_lookup, "_FIRST_CHUNK_PAGES", 2)
    offload, seq, _, payloads = host_pages(7, device_checksums=True)
    load = offload.match(seq, 3, 7)
    assert load is not None and load.start_page == 3 and load.wait() == 4
    for i, (rows, row) in enumerate(load.rows):
        assert torch.equal(staged_rows(rows)[row].cpu(), payloads[3 + i])


def test_a_host_tier_miss_stages_nothing():
    offload, seq, keys, _ = host_pages(7, device_checksums=True)
    offload.host.delete_many(keys[:1])
    assert offload.match(seq, 0, 7) is None
