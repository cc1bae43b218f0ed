"""Asks the shared KV store how much of a prompt it holds (metadata-only Lookup), so the policy
can price store pages at their transfer cost. A slow or down store is a miss, never an error.
Lookups go over the store's lookup socket when it offers one (cachestore/rpc/lookup_*.py:
no gRPC per-call cost), else gRPC Lookup."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kvmesh.cachestore.client.lookup import HELLO_RETRY_S, AsyncLookupSocket, socket_host
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
        self.token = token
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.metrics = metrics
        self._socket: AsyncLookupSocket | None = None
        self._next_hello = 0.0  # monotonic time to ask LookupHello (again)

    async def num_pages(self, namespace: Namespace, prompt_ids: list[int]) -> int:
        """Full pages of the prompt's contiguous prefix in the store; 0 on any failure."""
        request = store_pb2.LookupRequest(namespace=namespace_to_spec(namespace),
                                          token_ids=tokens_to_bytes(prompt_ids))
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                num_tokens = await self._lookup(request)
        except grpc.aio.AioRpcError as exc:
            self.metrics.store_lookup_errors.inc(code=exc.code().name)
            return 0
        except TimeoutError:
            self.metrics.store_lookup_errors.inc(code=grpc.StatusCode.DEADLINE_EXCEEDED.name)
            return 0
        except _Refused as exc:
            self.metrics.store_lookup_errors.inc(code=exc.code.name)
            return 0
        return num_tokens // namespace.page_size

    async def _lookup(self, request: store_pb2.LookupRequest) -> int:
        """Matched tokens, over the lookup socket when there is one, else gRPC Lookup."""
        sock = self._socket or await self._open()
        if sock is not None:
            try:
                code, body = await sock.call(request.SerializeToString())
            except OSError:  # the store went away or moved: gRPC says which
                self._socket = None
                sock.close()
            else:
                if code is not None:
                    raise _Refused(code)
                return store_pb2.LookupResponse.FromString(body).num_tokens
        response = await self.stub.Lookup(request, metadata=self.metadata)
        return response.num_tokens

    async def _open(self) -> AsyncLookupSocket | None:
        host = socket_host(self.address)
        if host is None or time.monotonic() < self._next_hello:
            return None
        self._next_hello = time.monotonic() + HELLO_RETRY_S
        try:
            reply = await self.stub.LookupHello(store_pb2.LookupHelloRequest(),
                                                metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # an older store: gRPC Lookup
                raise
            return None
        if reply.port and self._socket is None:  # (a concurrent probe may have opened it)
            self._socket = AsyncLookupSocket(host, reply.port, self.token or None)
        return self._socket

    async def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        await self.channel.close()


class _Refused(Exception):
    """The lookup socket answered an error status (what gRPC Lookup would have raised)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code
