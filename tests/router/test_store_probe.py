"""StoreProbe against a real `kvmesh store`: pages of the caller's namespace only; a store that
is not there is a miss and a metric, never an error."""

from __future__ import annotations

import asyncio
import time

import torch
from live_stack import Proc
from test_pool import closed_port

from kvmesh.cachestore.client.store_client import StoreClient
from kvmesh.cachestore.keys import Namespace
from kvmesh.router.metrics import RouterMetrics
from kvmesh.router.routing.store_probe import StoreProbe

NS = Namespace(model="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", page_size=4)


def test_probe_counts_the_tenants_stored_prefix(tmp_path):
    store = Proc(["store", "--port", "0", "--cpu-bytes", "16M"], str(tmp_path / "store.log"))
    try:
        address = store.wait_listening(time.monotonic() + 120)
        tokens = list(range(1000, 1042))  # 10 full pages + 2 tokens
        assert StoreClient(address).put(tokens, torch.randn(2, 2, 42, 2, 8), NS) == 10

        async def body():
            metrics = RouterMetrics()
            probe = StoreProbe(address, "", metrics)
            try:
                found = [await probe.num_pages(NS, tokens + [5, 6, 7]),
                         await probe.num_pages(NS, tokens[:9]),  # 2 full pages asked
                         await probe.num_pages(NS.with_salt("other"), tokens),
                         await probe.num_pages(NS, [7] + tokens)]
            finally:
                await probe.close()
            return found, metrics.store_lookup_errors.samples()

        # a loaded CI machine may answer the first lookup late (a counted miss): retry once
        found, errors = asyncio.run(body())
        if errors:
            found, errors = asyncio.run(body())
        assert (found, errors) == ([10, 2, 0, 0], {})
    finally:
        store.stop()


def test_probe_of_a_missing_store_is_a_miss():
    async def body():
        metrics = RouterMetrics()
        probe = StoreProbe(f"127.0.0.1:{closed_port()}", "", metrics)
        pages = await probe.num_pages(NS, list(range(40)))
        await probe.close()
        return pages, metrics.store_lookup_errors.samples()

    pages, errors = asyncio.run(body())
    assert pages == 0
    assert sum(errors.values()) == 1
