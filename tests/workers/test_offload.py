"""KvOffload's demotion of evicted device pages into the host tier."""

from __future__ import annotations

import torch

from cachestore.keys import Namespace
from workers.block_manager import EvictedPage
from workers.kv_upload import PageStager
from workers.offload import KvOffload

NS = Namespace("m", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", page_size=2)


def test_a_demoted_prefix_is_stored_in_order_and_evicted_from_its_end():
    """Pages come shallowest first: stored in that order (consecutive slots), but the deepest
    page is the least recently used, so the host tier drops a prefix's tail before its head."""
    tokens = list(range(8))
    keys = NS.page_keys(tokens)
    payload = bytes(NS.page_nbytes)
    page_nbytes = len(payload) + 100  # room for 3 encoded pages, not 4
    stager = PageStager((1, 2, 2, 1, 8), torch.float32, torch.device("cpu"))
    offload = KvOffload(lambda page_id: memoryview(payload), lambda ids: ([], None, None),
                        lambda slots: None, 3 * page_nbytes, stager)
    pages = [EvictedPage(i, keys[i], keys[i - 1] if i else None, tuple(tokens[2 * i:2 * i + 2]),
                         NS) for i in range(3)]
    offload.on_evict(pages)
    assert offload.host_keys() == [keys[2], keys[1], keys[0]]  # least recently used first
    offload.on_evict([EvictedPage(3, keys[3], keys[2], (6, 7), NS)])
    assert set(offload.host_keys()) == {keys[0], keys[1], keys[3]}  # the tail page went
    assert [e.kind for e in offload.pop_events()] == ["stored"] * 3 + ["stored", "removed"]
