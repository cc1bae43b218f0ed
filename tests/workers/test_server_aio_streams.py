"""What only the grpc.aio worker server (`--grpc-server aio`) adds: a KvEvents subscription
read in batches off the event loop, and one that a cancelled call closes (grpc.aio never runs a
sync handler's `add_callback`, so the coroutine's own cleanup must)."""

from __future__ import annotations

import time

import pytest
from engine_helpers import serve_loaded

from kvmesh.workers.config import WorkerConfig
from kvmesh.workers.errors import SubscriberTooSlow
from kvmesh.workers.service.client import WorkerClient
from kvmesh.workers.service.streams import EventSubscription


class NoLoop:
    def unsubscribe(self, subscription) -> None:
        pass

    def abort(self, engine_request_id: str) -> None:
        pass


def test_next_batch_takes_all_queued_then_the_end_on_the_next_call():
    subscription = EventSubscription(NoLoop())
    for event in ("a", "b", "c"):
        assert subscription._emit(event)
    subscription._end()
    assert [(e.seq, e.event) for e in subscription.next_batch()] == [(1, "a"), (2, "b"),
                                                                      (3, "c")]
    assert subscription.next_batch() == []
    assert subscription.next_batch() == []


def test_next_batch_raises_the_error_after_the_events_before_it():
    subscription = EventSubscription(NoLoop())
    subscription._emit("a")
    subscription._end(SubscriberTooSlow("behind"))
    assert [e.event for e in subscription.next_batch()] == ["a"]
    with pytest.raises(SubscriberTooSlow):
        subscription.next_batch()
    assert subscription.next_batch() == []


@pytest.mark.parametrize("grpc_server", ["sync", "aio"])
def test_a_cancelled_kv_events_call_unsubscribes(smollm2, grpc_server):
    config = WorkerConfig(model="smollm2", device="cpu", max_model_len=256,
                          kv_cache_bytes=64 << 20, max_num_seqs=4, grpc_server=grpc_server)
    handle, _ = serve_loaded(config, smollm2)
    loop = handle._loop  # the EngineLoop: its subscriptions are what a leak would keep
    try:
        with WorkerClient(handle.address) as client:
            streams = [client.kv_events() for _ in range(3)]
            firsts = [next(iter(stream)) for stream in streams]
            assert [(e.seq, e.kind) for e in firsts] == [(1, "cleared")] * 3
            assert len(loop._subscriptions) == 3
            for stream in streams:
                stream.close()
            deadline = time.monotonic() + 10
            while loop._subscriptions:
                assert time.monotonic() < deadline, "a cancelled subscription was kept"
                time.sleep(0.05)
            assert client.stats().num_running == 0  # the worker still answers
    finally:
        handle.stop()
