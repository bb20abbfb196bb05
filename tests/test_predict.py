"""`minigpt4qwen predict`: batched answers equal to `chat --query`'s, bad rows reported by line, resumable output.

Run: python -m pytest tests/test_predict.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_to_transformers import chat, make_run

MAX_NEW = 6


def predict(capsys, run: Path, src: Path, out: Path, *extra) -> tuple[int, str]:
    from minigpt4qwen.__main__ import main

    capsys.readouterr()
    code = main([str(a) for a in ("predict", "--checkpoint", run, "--input", src, "--out", out,
                                  "--max-new-tokens", MAX_NEW, *extra)])
    return code, capsys.readouterr().err


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def questions(tmp_path, shapes_data) -> tuple[Path, list[dict]]:
    """An input file next to its images folder (relative paths), one absolute path, one row with two images, and
    one bad row of each kind."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for name in ("heldout_00000.png", "heldout_00001.png", "heldout_00002.png"):
        (images / name).write_bytes((shapes_data / "images" / name).read_bytes())
    (images / "broken.png").write_bytes(b"not a png")
    good = [
        {"id": "a", "image": "images/heldout_00000.png", "question": "What color is the shape?"},
        {"id": 7, "image": str(images / "heldout_00001.png"), "question": "How many shapes are there?"},
        {"id": "c", "image": ["images/heldout_00002.png", "images/heldout_00000.png"],
         "question": "Where is the shape?", "extra": [1, 2]},
        {"id": "d", "image": "images/heldout_00001.png", "question": "Describe the picture in detail."},
    ]
    lines = [json.dumps(good[0]), "{'id': 1,", json.dumps(good[1]),
             json.dumps({"id": "m", "image": "images/heldout_00000.png"}), "",
             json.dumps({"id": "n", "image": "images/none.png", "question": "q"}), json.dumps(good[2]),
             json.dumps({"id": "x", "image": "images/broken.png", "question": "q"}), json.dumps(good[3])]
    src = tmp_path / "data" / "questions.jsonl"
    src.write_text("\n".join(lines) + "\n")
    return src, good


BAD_LINES = {2: "not valid JSON", 4: "no 'question'", 6: "images/none.png not found", 8: "broken.png cannot be decoded"}


def test_predict_answers_like_chat_reports_bad_rows_and_resumes(tmp_path, questions, wide_llm, capsys):
    run = make_run(tmp_path / "run", wide_llm)
    src, good = questions
    out = tmp_path / "answers.jsonl"
    code, err = predict(capsys, run, src, out, "--batch-size", "2")
    assert code == 1
    reported = {int(m.group(1)): m.group(2) for m in re.finditer(rf"{re.escape(str(src))}: line (\d+): (.*)", err)}
    assert reported.keys() == BAD_LINES.keys()
    assert all(BAD_LINES[n] in reported[n] for n in BAD_LINES)
    written = rows(out)
    assert [{k: v for k, v in r.items() if k != "answer"} for r in written] == good  # input rows, in order

    root = src.parent
    for row in written:  # one at a time, as chat asks: batching and padding change no answer
        paths = row["image"] if isinstance(row["image"], list) else [row["image"]]
        assert row["answer"] == chat(capsys, run, [root / p for p in paths], row["question"], MAX_NEW)
    assert len({r["answer"] for r in written}) > 1 and all(r["answer"] for r in written)

    # a kill during the last batch's write: the row before it stays, the cut line is dropped and answered again
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:15])
    code, err = predict(capsys, run, src, out, "--batch-size", "3")
    assert code == 1 and "dropped a partial last line" in err and "2 row(s) already answered, 3 to go" in err
    assert rows(out) == written

    code, err = predict(capsys, run, src, out)  # only the undecodable image's row is left, and still bad
    assert code == 1 and "4 row(s) already answered, 1 to go" in err and rows(out) == written


def test_predict_keeps_finished_batches_when_it_stops(tmp_path, questions, wide_llm, capsys, monkeypatch):
    """Each batch is on disk before the next one starts: a crash in batch 2 leaves batch 1, and a clean input
    file exits 0."""
    from minigpt4qwen.serve.generate import Assistant

    run = make_run(tmp_path / "run", wide_llm)
    src, good = questions
    clean = src.with_name("clean.jsonl")
    clean.write_text("".join(json.dumps(r) + "\n" for r in good))
    out = tmp_path / "answers.jsonl"
    real, calls = Assistant.generate, []

    def crash_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            assert len(rows(out)) == 2  # batch 1 was written and flushed before batch 2 started
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Assistant, "generate", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        predict(capsys, run, clean, out, "--batch-size", "2")
    monkeypatch.setattr(Assistant, "generate", real)
    code, err = predict(capsys, run, clean, out, "--batch-size", "2")
    assert code == 0 and "2 row(s) already answered, 2 to go" in err
    assert [r["id"] for r in rows(out)] == [r["id"] for r in good]


def test_predict_refuses_bad_output_and_arguments(tmp_path, questions, capsys):
    src, _ = questions
    out = tmp_path / "answers.jsonl"
    out.write_text('{"id": "a", "answer": "x"}\nnot json\n')
    code, err = predict(capsys, tmp_path / "no-run", src, out)
    assert code == 2 and re.fullmatch(rf"error: {re.escape(str(out))}: line 2 is not an output row .*\n", err)
    code, err = predict(capsys, tmp_path / "no-run", src, src)
    assert code == 2 and "is the input file" in err
    with pytest.raises(SystemExit):
        predict(capsys, tmp_path / "no-run", src, tmp_path / "new.jsonl", "--batch-size", "0")


def test_resume_reads_rows_whose_text_holds_unicode_line_separators(tmp_path):
    """Rows are written with ensure_ascii=False: U+2028/U+2029/U+0085 inside a string are no line ends."""
    from minigpt4qwen.serve.predict import answered_ids

    out = tmp_path / "answers.jsonl"
    rows = [{"id": 1, "question": "a\u2028b\u2029c\x85d", "answer": "x"}, {"id": "q2", "answer": "y"}]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert len(answered_ids(out)) == 2
