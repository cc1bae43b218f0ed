"""Asks the shared KV store how much of a prompt it holds (metadata-only Lookup), so the policy
can price store pages at their transfer cost. A slow or down store is a miss, never an error."""

from __future__ import annotations

import logging

import grpc

from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.cachestore.rpc.wire import namespace_to_spec
from kvmesh.router.metrics import RouterMetrics
from kvmesh.v1 import store_pb2, store_pb2_grpc

log = logging.getLogger(__name__)
LOOKUP_TIMEOUT_S = 0.05  # routing must stay fast; a late answer is treated as a miss


class StoreProbe:
    def __init__(self, address: str, token: str, metrics: RouterMetrics) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = store_pb2_grpc.KVStoreStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.metrics = metrics

    async def num_pages(self, namespace: Namespace, prompt_ids: list[int]) -> int:
        """Full pages of the prompt's contiguous prefix in the store; 0 on any failure."""
        request = store_pb2.LookupRequest(namespace=namespace_to_spec(namespace),
                                          token_ids=tokens_to_bytes(prompt_ids))
        try:
            response = await self.stub.Lookup(request, metadata=self.metadata,
                                              timeout=LOOKUP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self.metrics.store_lookup_errors.inc(code=exc.code().name)
            return 0
        return response.num_tokens // namespace.page_size

    async def close(self) -> None:
        await self.channel.close()
