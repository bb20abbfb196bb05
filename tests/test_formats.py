"""Annotation formats (seed JSON, LLaVA JSON) and bad input: one clear error naming the file/row, or counted skips."""

from __future__ import annotations

import json

import pytest

from minigpt4qwen.data.conversation import IMAGE_MARKER
from minigpt4qwen.data.formats import BadSampleError, load_annotations


def write(tmp_path, rows, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(rows))
    return p


def test_seed_single_and_multi_turn(tmp_path):
    p = write(tmp_path, [
        {"image": "a.jpg", "instruction": "<Img><ImageHere></Img> What is it?", "output": "A cat."},
        {"image": "b.jpg", "instruction": ["<Img><ImageHere></Img> q1", "q2"], "output": ["a1", "a2"]},
    ])
    samples, skipped = load_annotations(p, tmp_path / "imgs")
    assert not skipped and len(samples) == 2
    assert [t.role for t in samples[1].turns] == ["user", "assistant", "user", "assistant"]
    assert samples[1].turns[3].content == "a2" and samples[0].images == [tmp_path / "imgs" / "a.jpg"]


def test_llava_conversation_and_marker(tmp_path):
    p = write(tmp_path, [{"id": "1", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]}])
    (s,), _ = load_annotations(p)
    assert s.turns[0].content.startswith("<Img>" + IMAGE_MARKER + "</Img>") and s.turns[3].content == "No."
    assert s.images == [tmp_path / "x.png"]  # default image root: the annotation file's folder


def test_image_prompt_added_when_text_has_none(tmp_path):
    p = write(tmp_path, [{"image": "a.jpg", "instruction": "What is it?", "output": "x"}])
    (s,), _ = load_annotations(p)
    assert s.turns[0].content.count(IMAGE_MARKER) == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "a.jpg", "instruction": "q"}, "missing key 'output'"),
        ({"image": "a.jpg", "instruction": ["q1", "q2"], "output": ["a"]}, "2 instructions but 1 outputs"),
        ({"image": ["a.jpg", "b.jpg"], "instruction": "<ImageHere> q", "output": "a"}, "1 image markers"),
        ({"id": 1, "conversations": [{"from": "gpt", "value": "hi"}]}, "must start with human"),
        ({"id": 1, "conversations": [{"from": "bot", "value": "hi"}]}, "conversations\\[0\\] needs 'from'"),
        ("just a string", "expected an object"),
    ],
)
def test_malformed_rows_name_file_and_row(tmp_path, row, message):
    good = {"image": "a.jpg", "instruction": "q", "output": "a"}
    p = write(tmp_path, [good, row])
    with pytest.raises(BadSampleError, match=f"ann.json row 1: .*{message}"):
        load_annotations(p)
    samples, skipped = load_annotations(p, on_bad="skip")
    assert len(samples) == 1 and len(skipped) == 1 and "row 1" in skipped[0]


def test_broken_json_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("[{")
    with pytest.raises(BadSampleError, match="broken.json: not valid JSON"):
        load_annotations(p)
