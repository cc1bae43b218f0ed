"""A Generate stream's outputs as the handler thread takes them: all that is queued at each
wake-up, merged to one output per completion (fewer, larger GenerateResponses when it lags)."""

from __future__ import annotations

import threading

import pytest

from kvmesh.workers.engine.outputs import RequestOutput, Usage
from kvmesh.workers.errors import EngineFailure
from kvmesh.workers.service.streams import RequestStream, coalesce


class NoLoop:
    """A stream's loop commands; these streams are never cancelled."""

    def abort(self, engine_request_id: str) -> None:
        raise AssertionError("not cancelled")

    def unsubscribe(self, subscription) -> None:
        raise AssertionError("no subscription")


def out(index: int, ids: list[int], text: str, finish: str | None = None) -> RequestOutput:
    usage = Usage(4, 3, 0) if finish else None
    return RequestOutput("r", index, ids, text, finish, usage)


def test_queued_outputs_come_as_one_batch_merged_per_completion():
    stream = RequestStream(NoLoop(), "r")
    for output in (out(0, [1], "a"), out(1, [2], "b"), out(0, [3], "c"),
                   out(0, [4], "d", "length"), out(1, [5], "e")):
        stream._put(output)
    batches = stream.batches()
    batch = next(batches)
    assert len(batch) == 5
    assert coalesce(batch) == [out(0, [1, 3, 4], "acd", "length"), out(1, [2, 5], "be")]
    stream._put(out(1, [6], "f", "stop"))
    stream._finish()
    assert list(batches) == [[out(1, [6], "f", "stop")]]


def test_each_output_alone_while_the_reader_keeps_up():
    stream = RequestStream(NoLoop(), "r")
    outputs = [out(0, [i], str(i)) for i in range(3)] + [out(0, [9], "9", "stop")]
    taken, reader_done = [], threading.Event()
    fed = [threading.Event() for _ in outputs]

    def read() -> None:
        for i, batch in enumerate(stream.batches()):
            taken.append(batch)
            if i + 1 < len(fed):
                fed[i + 1].set()
        reader_done.set()

    thread = threading.Thread(target=read)
    thread.start()
    fed[0].set()
    for output, ready in zip(outputs, fed, strict=True):
        assert ready.wait(10)
        stream._put(output)
    stream._finish()
    assert reader_done.wait(10)
    thread.join()
    assert taken == [[o] for o in outputs]


def test_outputs_before_an_error_are_delivered_then_it_raises():
    stream = RequestStream(NoLoop(), "r")
    stream._put(out(0, [1], "a"))
    stream._put(out(0, [2], "b"))
    stream._finish(EngineFailure("step failed"))
    batches = stream.batches()
    assert coalesce(next(batches)) == [out(0, [1, 2], "ab")]
    with pytest.raises(EngineFailure, match="step failed"):
        next(batches)
