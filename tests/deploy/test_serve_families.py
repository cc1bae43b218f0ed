"""`kvmesh serve --model <folder>` with a family other than Llama: a tiny random Qwen2 (q/k/v
bias, tied embeddings; SmolLM2's tokenizer and chat template) saved as a Hugging Face folder,
served by the real stack and asked through the official `openai` client. Its chat answer is
transformers' greedy text on the same folder."""

from __future__ import annotations

import shutil

import openai
import pytest
import torch
from serve_stack import Stack

from kvmesh.workers.models.loader import hf_folder_for

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    """A tiny random Qwen2ForCausalLM over SmolLM2's vocabulary (its EOS is SmolLM2's), with
    SmolLM2's tokenizer files beside it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer_folder = hf_folder_for("smollm2")[0]
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # sharper logits; a bias that matters
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2"
    model.save_pretrained(folder)
    for path in tokenizer_folder.iterdir():
        if path.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(path, folder / path.name)
    return folder


def test_a_qwen2_folder_answers_a_chat_with_transformers_greedy_text(qwen2_folder,
                                                                     tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_folder)
    hf = AutoModelForCausalLM.from_pretrained(qwen2_folder, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=MAX_TOKENS)[0, len(prompt):].tolist()
    expected = tokenizer.decode(out, skip_special_tokens=True)
    assert expected.strip()

    stack = Stack(tmp_path_factory.mktemp("serve-qwen2") / "data", "--workers", "1",
                  "--model", str(qwen2_folder))
    try:
        stack.wait_ready(300)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="none",
                               max_retries=0, timeout=120)
        (model,) = client.models.list().data
        assert model.id == "tiny-qwen2"
        response = client.chat.completions.create(model=model.id, messages=MESSAGES,
                                                  max_tokens=MAX_TOKENS, temperature=0)
        assert response.choices[0].message.content == expected
        assert response.usage.prompt_tokens == len(prompt)
        assert response.usage.completion_tokens == len(out)
    finally:
        stack.close()
