"""Incremental detokenization with stop strings.

Text is decoded over a short window of recent tokens (a token can change how the previous ones
render, and an unfinished UTF-8 sequence renders as U+FFFD until its last byte arrives), so each
step costs O(window), not O(output). A fast tokenizer whose decode does no clean-up of spaces
does that in one native call per token (`tokenizers.decoders.DecodeStream`: 0.6 us a token
against 4.2 us for the two window decodes, SmolLM2 on the CI machine); others decode the two
windows here. When stop strings are set, the last len(longest stop) - 1 characters are held back
until it is clear they do not start a stop string; the stop string itself is never sent.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.num_sent = 0
        self.hit_stop = False
        self._stream = decode_stream(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # benchmarks on random weights: tokens only
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int, skip: bool = False) -> str:
        """Append a token (skip=True: a special token that adds no text); returns the text that
        can be sent now."""
        if self.hit_stop or self.tokenizer is None:
            return ""
        if not skip:
            piece = self._next_piece(token_id)
            if piece:
                old_len = len(self.text)
                self.text += piece
                self._check_stop(old_len)
        if self.hit_stop:
            return self.flush()
        safe_end = len(self.text) - self.holdback
        if safe_end <= self.num_sent:
            return ""
        delta = self.text[self.num_sent : safe_end]
        self.num_sent = safe_end
        return delta

    def _next_piece(self, token_id: int) -> str:
        """The text this token completes ("" while it is unfinished)."""
        if self._stream is not None:
            stream, backend = self._stream
            return stream.step(backend, token_id) or ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def _check_stop(self, old_len: int) -> None:
        if not self.stop:
            return
        start = max(0, old_len - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.hit_stop = True

    def flush(self) -> str:
        """Everything not sent yet (at the end of the completion)."""
        delta = self.text[self.num_sent :]
        self.num_sent = len(self.text)
        return delta


def decode_stream(tokenizer: Any) -> tuple[Any, Any] | None:
    """(a DecodeStream skipping special tokens, the native tokenizer it steps on) for a fast
    tokenizer whose `decode` does no clean-up of spaces (so the two give the same text); None
    otherwise, or where tokenizers is too old to have it (< 0.21)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    return DecodeStream(skip_special_tokens=True), backend
