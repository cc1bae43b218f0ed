"""The model's tokenizer and chat template, loaded from the same file the workers serve."""

from __future__ import annotations

import os
from collections.abc import Sequence


class PromptTokenizer:
    """Wraps a transformers tokenizer loaded from a GGUF file or a HF folder (never a hub)."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer  # heavy import: only when a router starts

        if os.path.isfile(model_path):
            folder, name = os.path.split(os.path.abspath(model_path))
            self._tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        else:
            self._tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model_path = model_path

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the tokenizer's usual special tokens."""
        return list(self._tok(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered by the model's template, ready for the assistant turn."""
        text = self._tok.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))
