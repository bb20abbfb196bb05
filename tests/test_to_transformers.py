"""`minigpt4qwen convert to-transformers`: the export loads in plain transformers and answers as `chat --query`.

The exported directories are read in a subprocess that never imports minigpt4qwen (it checks so itself), through
`Blip2ForConditionalGeneration.from_pretrained`, `AutoProcessor` and the exported chat template. The runs are built
without training (random tiny parts, saved as a checkpoint); their LLM has a wider init than `random:tiny-qwen2` so
that greedy answers are words that depend on the image, not one token repeated.

Run: python -m pytest tests/test_to_transformers.py
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES

QUESTIONS = [("heldout_00000.png", "What color is the shape?"), ("heldout_00001.png", "How many shapes are there?")]
MAX_NEW = 8


def make_run(root: Path, *overrides: str, lora_std: float = 0.0) -> Path:
    """A run directory with one checkpoint of the freshly built model (what `train` would have saved at step 1)."""
    from minigpt4qwen.config import load_config
    from minigpt4qwen.models.minigpt4qwen import build_model
    from minigpt4qwen.runs import save_checkpoint, save_run_config

    cfg = load_config(None, [*TINY_OVERRIDES, f"train.output_dir={root}", *overrides])
    torch.manual_seed(cfg.train.seed)  # as load_run seeds it: the frozen random LLM rebuilds the same
    model = build_model(cfg.model).model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a fresh adapter is zero; a trained one is not
                p.normal_(std=lora_std)
    root.mkdir(parents=True)
    save_run_config(cfg, root)
    save_checkpoint(root, 1, model.trainable_state_dict(), {}, {"step": 1})
    return root


def chat(capsys, run: Path, images: Path | list[Path], question: str, max_new_tokens: int = MAX_NEW) -> str:
    """`chat --query`'s printed answer, on CPU (what the tests compare it with runs there, also on a GPU machine)."""
    from minigpt4qwen.__main__ import main

    capsys.readouterr()
    flags = [a for image in (images if isinstance(images, list) else [images]) for a in ("--image", image)]
    argv = ["chat", "--checkpoint", run, *flags, "--query", question, "--max-new-tokens", max_new_tokens,
            "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out.strip()


PLAIN = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Blip2ForConditionalGeneration

export, images, questions, suppress, MAX_NEW = sys.argv[1], *(json.loads(a) for a in sys.argv[2:6])
model = Blip2ForConditionalGeneration.from_pretrained(export)
processor = AutoProcessor.from_pretrained(export, backend="pil")
tokenizer, image_processor = AutoTokenizer.from_pretrained(export), AutoImageProcessor.from_pretrained(export, backend="pil")
rows = []
for image, question in zip(images, questions):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
    pixel_values = image_processor(Image.open(image), return_tensors="pt")["pixel_values"]
    out = model.generate(input_ids=input_ids, pixel_values=pixel_values, do_sample=False, max_new_tokens=MAX_NEW,
                         **({"suppress_tokens": suppress} if suppress else {}))
    new = out[0, input_ids.shape[1]:]
    prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    via_processor = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
    rows.append({"prompt_ids": input_ids[0].tolist(), "new_ids": new.tolist(),
                 "answer": tokenizer.decode(new, skip_special_tokens=True).strip(), "logits": logits.tolist(),
                 "processor_ids": via_processor["input_ids"][0].tolist(),
                 "processor_pixels_equal": torch.equal(via_processor["pixel_values"], pixel_values)})
print(json.dumps({"rows": rows, "imported_minigpt4qwen": any(m.startswith("minigpt4qwen") for m in sys.modules),
                  "config": model.config.to_dict(), "processor": type(processor).__name__,
                  "stop_ids": model.language_model.generation_config.eos_token_id}))
"""


def plain_transformers(export: Path, images: list[Path], questions: list[str], suppress=()) -> dict:
    """The export read by plain transformers in a fresh interpreter (cwd and PYTHONPATH away from the sources)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PLAIN, str(export), json.dumps([str(i) for i in images]),
                           json.dumps(questions), json.dumps(list(suppress)), str(MAX_NEW)],
                          check=False, capture_output=True, text=True, cwd=export, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["imported_minigpt4qwen"]
    return result


def our_side(run: Path, image: Path, question: str, adapters: bool = True) -> tuple[list[int], torch.Tensor]:
    """Our prompt ids and last-position logits for one question (the path chat takes); `adapters=False`: a LoRA
    run's base LLM alone."""
    from minigpt4qwen.serve.generate import Assistant
    from minigpt4qwen.serve.session import ChatSession

    assistant = Assistant.from_run(run, device="cpu")
    turns = ChatSession(assistant, [str(image)], None).turns_for(question)
    ids = assistant.template.encode(turns, add_generation_prompt=True).input_ids
    embeds, mask = assistant.prepare([turns], [[image]])
    llm = assistant.model.llm
    with torch.no_grad(), (contextlib.nullcontext() if adapters else llm.disable_adapter()):
        return ids, llm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]


def export(capsys, run: Path, out: Path) -> str:
    from minigpt4qwen.__main__ import main

    capsys.readouterr()
    assert main(["convert", "to-transformers", "--checkpoint", str(run), "--out", str(out)]) == 0
    return capsys.readouterr().out


def test_export_answers_like_chat_in_plain_transformers(tmp_path, shapes_data, wide_llm, capsys):
    run = make_run(tmp_path / "run", wide_llm)
    images = [shapes_data / "images" / name for name, _ in QUESTIONS]
    questions = [q for _, q in QUESTIONS]
    answers = [chat(capsys, run, image, q) for image, q in zip(images, questions)]
    assert all(answers) and answers[0] != answers[1]  # words that depend on the image and question

    printed = export(capsys, run, tmp_path / "hf")
    assert "chat template checked" in printed and "eps 1e-05 here, 1e-06 in transformers" in printed
    result = plain_transformers(tmp_path / "hf", images, questions)
    assert [r["answer"] for r in result["rows"]] == answers
    cfg = result["config"]
    assert cfg["architectures"] == ["Blip2ForConditionalGeneration"] and cfg["num_query_tokens"] == 4
    assert cfg["image_token_index"] == 3 and cfg["text_config"]["model_type"] == "qwen2"
    assert result["processor"] == "Blip2Processor" and result["stop_ids"] == [2]  # <|im_end|>, where chat stops
    for row, image, question in zip(result["rows"], images, questions):
        ids, logits = our_side(run, image, question)
        # the chat template + whole-text tokenization give our piecewise ids; Blip2Processor prepends nothing
        assert row["prompt_ids"] == ids and row["processor_ids"] == ids and row["processor_pixels_equal"]
        assert ids.count(3) == 4
        # same numbers up to the ln_vision eps (1e-5 ours, 1e-6 in transformers' one vision eps)
        torch.testing.assert_close(torch.tensor(row["logits"]), logits, rtol=0, atol=1e-4)


def test_export_merges_lora(tmp_path, shapes_data, wide_llm, capsys):
    run = make_run(tmp_path / "run", wide_llm, "model.trainable.llm=lora", lora_std=0.3)
    image, question = shapes_data / "images" / QUESTIONS[0][0], QUESTIONS[0][1]
    answer = chat(capsys, run, image, question)
    assert "LoRA adapters merged" in export(capsys, run, tmp_path / "hf")
    row = plain_transformers(tmp_path / "hf", [image], [question])["rows"][0]
    assert row["answer"] == answer

    _, logits = our_side(run, image, question)
    _, base = our_side(run, image, question, adapters=False)
    assert (base - logits).abs().max() > 1e-2  # the adapters matter...
    torch.testing.assert_close(torch.tensor(row["logits"]), logits, rtol=0, atol=1e-4)  # ...and were merged


def test_export_grows_the_table_for_an_added_image_token(tmp_path, shapes_data, wide_llm, capsys):
    """SmolLM2's case: the image token is added to the tokenizer past the LLM's table (ours never looks it up)."""
    run = make_run(tmp_path / "run", "model.llm=random:tiny-wide-400", "model.image_token=<|img|>")
    image, question = shapes_data / "images" / QUESTIONS[1][0], QUESTIONS[1][1]
    answer = chat(capsys, run, image, question)
    printed = export(capsys, run, tmp_path / "hf")
    assert "added zero rows [400]" in printed and "suppress_tokens=[400]" in printed
    result = plain_transformers(tmp_path / "hf", [image], [question], suppress=[400])
    assert result["config"]["image_token_index"] == 400 and result["config"]["text_config"]["vocab_size"] == 401
    assert result["rows"][0]["answer"] == answer and result["rows"][0]["prompt_ids"].count(400) == 4


def test_chat_template_for_a_tokenizer_template_run_and_a_mismatch():
    """Runs on another tokenizer's own template get it behind the same flattening; a template that renders other
    ids than ours is refused in one line before anything is written."""
    from minigpt4qwen.data.conversation import ChatTemplate
    from minigpt4qwen.models.convert.hf_blip2 import ChatTemplateMismatch, blip2_chat_template, check_chat_template
    from minigpt4qwen.models.llm import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for style, system in (("tokenizer", "You are a helpful assistant."), ("chatml", ""), ("chatml", "Be brief.")):
        template = ChatTemplate(tokenizer, image_id, 4, system, style)
        tokenizer.chat_template = blip2_chat_template(template, "<|image_pad|>")
        check_chat_template(tokenizer, template)
    tokenizer.chat_template = blip2_chat_template(ChatTemplate(tokenizer, image_id, 3, "Be brief.", "chatml"),
                                                  "<|image_pad|>")
    with pytest.raises(ChatTemplateMismatch, match=r"^[^\n]*first difference at token \d+[^\n]*$"):
        check_chat_template(tokenizer, template)  # 3 image tokens where the run has 4
