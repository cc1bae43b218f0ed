"""The `Worker` servicer for the grpc.aio server (`WorkerConfig.grpc_server="aio"`, issue 19).

Generate is a coroutine on the server's one event-loop thread: it waits on its RequestStream
without a thread of its own, and the EngineLoop wakes every stream a step fed with one
`call_soon_threadsafe` per loop iteration (`on_streams_ready`). A sync server instead parks a
handler thread per stream, and each message it sends costs several GIL hand-offs with the
engine thread. KvEvents is a coroutine too (its queue reads run on the executor); Stats and
PushPages are the sync servicer's. Answers, errors and their trailing metadata are the sync
servicer's, message for message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

from kvmesh.v1 import worker_pb2
from kvmesh.workers.service.handoff import Handoff
from kvmesh.workers.service.servicer import WorkerServicer, abort_args, prefill_final
from kvmesh.workers.service.streams import RequestStream, coalesce
from kvmesh.workers.service.wire import event_to_pb, output_to_pb


def wake_streams(event_loop: asyncio.AbstractEventLoop) -> Any:
    """The EngineLoop's `on_streams_ready` hook: one hand-off to `event_loop` per call."""

    def wake_all(streams: list[RequestStream]) -> None:
        for stream in streams:
            stream.wake()

    def on_streams_ready(streams: list[RequestStream]) -> None:
        try:
            event_loop.call_soon_threadsafe(wake_all, streams)
        except RuntimeError:  # the server's loop closed (stopping): nobody is left to wake
            pass

    return on_streams_ready


class AioWorkerServicer(WorkerServicer):
    """WorkerServicer with async Generate and KvEvents; Stats and PushPages are the sync ones,
    run on the server's migration thread pool. `executor` runs what blocks: KV event queue
    reads and prefill handovers. (grpc.aio never calls a sync handler's `add_callback`
    callbacks, so every streaming handler that must clean up is a coroutine here.)"""

    def __init__(self, loop: Any, max_num_seqs: int, executor: Executor, role: str = "both",
                 token: str | None = None) -> None:
        super().__init__(loop, max_num_seqs, role=role, token=token)
        self._executor = executor

    async def Generate(  # type: ignore[override]
        self, request: worker_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        try:
            request_id, handoff, stream = self._start(request)
        except Exception as exc:  # noqa: BLE001 - mapped by the table
            await context.abort(*abort_args(context, exc))
            return
        # A client that cancels or disconnects cancels this coroutine: the finally aborts the
        # request so its pages are freed (a no-op once the request finished).
        try:
            if handoff is None:
                async for outputs in stream.abatches():
                    for output in coalesce(outputs):
                        yield output_to_pb(request_id, output)
            else:
                async for response in self._prefill_async(request_id, request, stream,
                                                          handoff):
                    yield response
        except Exception as exc:  # noqa: BLE001
            await context.abort(*abort_args(context, exc))
        finally:
            stream.cancel()


    async def _prefill_async(
        self, request_id: str, request: worker_pb2.GenerateRequest, stream: RequestStream,
        handoff: Handoff,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """WorkerServicer._prefill on the event loop; the handover's wait runs on the executor."""
        event_loop = asyncio.get_running_loop()
        async for outputs in stream.abatches():
            for output in outputs:
                yield output_to_pb(request_id, output, with_finish=False)
                if output.finish_reason is not None:
                    yield await event_loop.run_in_executor(
                        self._executor, prefill_final, request_id, request, output, handoff)

    async def KvEvents(  # type: ignore[override]
        self, request: worker_pb2.KvEventsRequest, context: Any
    ) -> AsyncIterator[worker_pb2.KvEvent]:
        try:
            subscription = self._loop.subscribe()
        except Exception as exc:  # noqa: BLE001
            await context.abort(*abort_args(context, exc))
            return
        epoch = self._loop.epoch
        event_loop = asyncio.get_running_loop()
        try:
            while batch := await event_loop.run_in_executor(self._executor,
                                                            subscription.next_batch):
                for item in batch:
                    yield event_to_pb(item.seq, item.event, epoch)
        except Exception as exc:  # noqa: BLE001
            await context.abort(*abort_args(context, exc))
        finally:
            subscription.close()  # also unblocks a next_batch still waiting on the executor
