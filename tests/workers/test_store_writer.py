"""StoreWriter against a real store server: the host rows of a CPU page pool go to the store
through put_pages_from (encoded in the store's shared-memory slots, or as frames without shared
memory), several calls for one write_through, byte for byte what encode_page makes of the
pool's pages, with a "stored" event per call."""

from __future__ import annotations

import pytest
import torch

from kvmesh.cachestore import Namespace, StoreClient
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.keys import tokens_to_bytes
from kvmesh.workers.offload import store_writer
from kvmesh.workers.runner.kv_pool import PoolPages

NS = Namespace("writer", num_layers=2, num_kv_heads=3, head_dim=8, dtype=torch.bfloat16,
               page_size=4)


@pytest.mark.parametrize("shared_memory", [None, False])
def test_written_through_pages_are_stored_as_encoded_in_calls_of_a_bounded_size(
        store_server, monkeypatch, shared_memory):
    monkeypatch.setattr(store_writer, "_WRITE_BATCH_NBYTES", 3 * NS.page_nbytes)
    pool = PoolPages(10, NS.page_shape, torch.bfloat16, torch.device("cpu"))
    pool.kv_pool.copy_(torch.randn(pool.kv_pool.shape))
    rows = pool.kv_pool.clone()
    tokens = list(range(100, 132))
    keys = NS.page_keys(tokens)  # 8 pages, written from pool pages 9, 1, 2, ... 7
    page_ids = [9, *range(1, 8)]
    events = []
    with StoreClient(store_server.target, shared_memory=shared_memory) as client:
        writer = store_writer.StoreWriter(client, pool, events.append)
        try:
            writer.write_through(NS, [(key, tokens[4 * i : 4 * i + 4], page_ids[i])
                                      for i, key in enumerate(keys)])
            pool.kv_pool.zero_()  # the writer sends its host copies, not the pool
            writer.flush()
        finally:
            writer.close()
        assert (writer.num_errors, writer.num_dropped) == (0, 0)
        assert [event.keys for event in events] == [keys[:3], keys[3:6], keys[6:]]
        assert {(event.kind, event.tier) for event in events} == {("stored", "store")}
        stored = client.get_pages(keys)
        if shared_memory is None:
            assert client._shm_puts.num_pages_copied == 8
    for i, (key, blob) in enumerate(zip(keys, stored, strict=True)):
        payload = memoryview(rows[page_ids[i]].view(torch.uint8).numpy())
        assert blob is not None
        assert bytes(blob) == encode_page(NS, key, tokens_to_bytes(tokens[4 * i : 4 * i + 4]),
                                          payload)
