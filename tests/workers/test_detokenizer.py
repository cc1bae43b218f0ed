"""Incremental detokenization on SmolLM2's tokenizer: the native stream and the window decodes
send the same text, token by token, and it adds up to one decode of all the tokens."""

from __future__ import annotations

import pytest

import kvmesh.workers.engine.detokenizer
from kvmesh.workers.engine.detokenizer import IncrementalDetokenizer

TEXT = ("Snow falls on the quiet hills, é à ü — 雪が降る 😀🎉, and then: 'done'.\n"
        "  Two  spaces,\ttabs, and ... punctuation?! ")


def deltas(tokenizer, ids, stop):
    detok = IncrementalDetokenizer(tokenizer, stop)
    out = [detok.add(i) for i in ids]
    return out + [detok.flush()], detok.hit_stop


@pytest.mark.parametrize("stop", [[], ["雪"], ["and then", "never"], ["!"]])
def test_the_native_stream_sends_what_the_window_decodes_send(smollm2, monkeypatch, stop):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # the fast path is on
    assert kvmesh.workers.engine.detokenizer.decode_stream(tokenizer) is not None
    streamed, stream_stopped = deltas(tokenizer, ids, stop)
    monkeypatch.setattr(kvmesh.workers.engine.detokenizer, "decode_stream", lambda tokenizer: None)
    windowed, window_stopped = deltas(tokenizer, ids, stop)
    assert streamed == windowed and stream_stopped == window_stopped == bool(stop)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(streamed) == (text[: min(text.index(s) for s in stop if s in text)]
                                 if stop else text)


def test_a_tokenizer_that_cleans_up_spaces_decodes_windows(smollm2, monkeypatch):
    monkeypatch.setattr(smollm2.tokenizer, "clean_up_tokenization_spaces", True)
    assert kvmesh.workers.engine.detokenizer.decode_stream(smollm2.tokenizer) is None
