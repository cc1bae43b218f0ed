"""The model's tokenizer and chat template, loaded from the same file the workers serve.

Calls are blocking and may take seconds on a large prompt: the HTTP layer runs them in a thread
pool, never on the event loop."""

from __future__ import annotations

import os
from collections.abc import Sequence


class PromptTokenizer:
    """Wraps a transformers tokenizer loaded from a GGUF file or a HF folder (never a hub).

    `split_special_tokens`: special-token text inside chat message content (`<|im_start|>`) is
    encoded as plain text, so only the template's own control tokens become control token ids.
    Completion prompts are always parsed: their caller writes the whole prompt, template and all.
    """

    def __init__(self, model_path: str, split_special_tokens: bool = True) -> None:
        from transformers import AutoTokenizer  # heavy import: only when a router starts

        if os.path.isfile(model_path):
            folder, name = os.path.split(os.path.abspath(model_path))
            self._tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        else:
            self._tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model_path = model_path
        self.split_special_tokens = split_special_tokens
        # The most characters one token decodes to: a prompt longer than max_model_len times
        # this cannot fit the context, whatever its tokens (checked before tokenizing).
        self.max_token_chars = max(
            len(self._tok.convert_tokens_to_string([token])) for token in self._tok.get_vocab())

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the tokenizer's usual special tokens."""
        return list(self._tok(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered by the model's template, ready for the assistant turn."""
        from transformers import BatchEncoding  # loaded already by __init__

        if self.split_special_tokens:  # transformers marks the control tokens found in content
            encoded = self._tok.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=True,
                sanitize_control_tokens=True)
            assert isinstance(encoded, BatchEncoding)  # tokenize and return_dict
            return list(encoded["input_ids"])
        text = self._tok.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
        assert isinstance(text, str)  # not tokenized
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))
