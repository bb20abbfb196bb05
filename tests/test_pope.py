"""POPE evaluator on question files in POPE's own layout, with metrics worked out by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from minigpt4qwen.__main__ import main
from minigpt4qwen.data.formats import BadSampleError
from minigpt4qwen.eval import pope
from minigpt4qwen.eval.mme import DEFAULT_SUFFIX

# split -> [(question_id, image, text, label)], as in POPE's output/coco/coco_pope_<split>.json
QUESTIONS = {
    "random": [
        (1, "COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "yes"),
        (2, "COCO_val2014_000000000001.jpg", "Is there a boat in the image?", "no"),
        (3, "COCO_val2014_000000000002.jpg", "Is there a person in the image?", "yes"),
        (4, "COCO_val2014_000000000002.jpg", "Is there a kite in the image?", "no"),
    ],
    "adversarial": [
        (1, "COCO_val2014_000000000002.jpg", "Is there a person in the image?", "yes"),
        (2, "COCO_val2014_000000000001.jpg", "Is there a cat in the image?", "no"),
    ],
}


def _write_pope(root: Path, questions: dict = QUESTIONS) -> tuple[Path, Path]:
    """POPE's repo layout (output/coco/coco_pope_<split>.json, JSON lines) and a COCO val2014 image folder."""
    qdir, images = root / "POPE" / "output" / "coco", root / "val2014"
    qdir.mkdir(parents=True)
    images.mkdir()
    for split, rows in questions.items():
        lines = [json.dumps({"question_id": q, "image": i, "text": t, "label": lab}) for q, i, t, lab in rows]
        (qdir / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
        for _, image, _, _ in rows:
            Image.new("RGB", (8, 8), "blue").save(images / image)
    return root / "POPE", images


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("no", "no"),
        ("No.", "no"),
        ("There is not a cat.", "no"),
        ("The answer is no", "no"),
        ("NO", "yes"),  # POPE matches 'No', 'no', 'not' as whole words, case-sensitively
        ("Nope", "yes"),
        ("Not sure", "yes"),
        ("no,dog", "yes"),  # commas are deleted, not split on
        ("I see a cat. It is not a dog.", "yes"),  # only the first sentence counts
        ("", "yes"),
    ],
)
def test_parse_answer_follows_pope(text: str, label: str) -> None:
    assert pope.parse_answer(text) == label


def test_score_by_hand() -> None:
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    answers = ["yes", "Yes there is", "No", "no.", "yes", "No", "not", "There is not one."]
    # parsed: y y n n | y n n n -> TP 2, FN 2, FP 1, TN 3
    s = pope.score(answers, labels)
    assert (s["tp"], s["fn"], s["fp"], s["tn"], s["n"]) == (2, 2, 1, 3, 8)
    assert s["accuracy"] == pytest.approx(5 / 8)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert s["yes_ratio"] == pytest.approx(3 / 8)
    never_yes = pope.score(["no", "no"], ["yes", "no"])
    assert never_yes["precision"] == 0.0 and never_yes["f1"] == 0.0 and never_yes["accuracy"] == 0.5


def test_evaluate_pope_scores_and_writes_pope_answer_files(tmp_path: Path) -> None:
    root, images = _write_pope(tmp_path)
    fixed = ["Yes.", "No, there is not.", "yes", "Yes", "no", "no"]  # random: y n y y; adversarial: n n
    batches = []

    def answer_fn(batch):
        batches.append(batch)
        start = sum(len(b) for b in batches[:-1])
        return fixed[start : start + len(batch)]

    data = pope.read_pope(root, images, ["random", "adversarial"])
    summary = pope.evaluate_pope(answer_fn, data, tmp_path / "out", batch_size=4, progress=False)
    assert [len(b) for b in batches] == [4, 2]  # batches cross split borders
    assert batches[0][0] == (images / "COCO_val2014_000000000001.jpg", f"Is there a dog in the image? {DEFAULT_SUFFIX}")
    # random: TP 2 (q1, q3), FP 1 (q4), TN 1 (q2), FN 0
    r = summary["splits"]["random"]
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"]) == pytest.approx((0.75, 2 / 3, 1.0, 0.75))
    assert r["f1"] == pytest.approx(0.8)
    # adversarial: FN 1, TN 1; the model never says yes, so precision, recall and F1 are 0
    a = summary["splits"]["adversarial"]
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0, 0.0)
    avg = summary["average"]
    assert (avg["accuracy"], avg["precision"], avg["recall"], avg["f1"], avg["yes_ratio"]) == pytest.approx(
        (0.625, 1 / 3, 0.5, 0.4, 0.375))
    out = tmp_path / "out"
    assert [json.loads(line) for line in (out / "coco_pope_adversarial_answers.json").read_text().splitlines()] == [
        {"question_id": 1, "answer": "no"}, {"question_id": 2, "answer": "no"}]
    assert not (out / "coco_pope_popular_answers.json").exists()
    assert pope.score_answer_dir(out, root) == summary
    assert json.loads((out / "summary.json").read_text()) == summary
    table = (out / "summary.md").read_text()
    assert "| random | 75.00 | 66.67 | 100.00 | 80.00 | 75.00 |" in table
    assert "| **average** | 62.50 | 33.33 | 50.00 | 40.00 | 37.50 |" in table


def test_rescore_command_and_mismatched_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _write_pope(tmp_path)
    out = tmp_path / "answers"
    out.mkdir()
    (out / "coco_pope_random_answers.json").write_text(
        "".join(json.dumps({"question_id": i, "answer": a}) + "\n" for i, a in [(1, "yes"), (2, "no"), (3, "no"),
                                                                                  (4, "no")]))
    pope.main([str(out), "--pope-root", str(root)])  # TP 1, TN 2, FN 1: acc 75, precision 100, recall 50
    assert "| random | 75.00 | 100.00 | 50.00 | 66.67 | 25.00 |" in capsys.readouterr().out
    (out / "coco_pope_random_answers.json").write_text('{"question_id": 2, "answer": "no"}\n' * 4)
    with pytest.raises(BadSampleError, match=r"coco_pope_random_answers\.json:1: question_id 2 .* has 1"):
        pope.score_answer_dir(out, root)
    (out / "coco_pope_random_answers.json").write_text('{"question_id": 1, "answer": "no"}\n')
    with pytest.raises(BadSampleError, match="1 answers for 4 questions"):
        pope.score_answer_dir(out, root)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Q?", "label": "no"', "not valid JSON"),
        ('{"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Q?"}', "missing field 'label'"),
        ('{"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Q?", "label": "maybe"}',
         "label must be yes or no"),
        ('{"question_id": 2, "image": 7, "text": "Q?", "label": "no"}', "field 'image' must be str"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"question_id": 2, "image": "COCO_val2014_000000000009.jpg", "text": "Q?", "label": "no"}',
         "image COCO_val2014_000000000009.jpg not found in"),
    ],
)
def test_malformed_question_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    root, images = _write_pope(tmp_path)
    path = root / "output" / "coco" / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    lines[1] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match=rf"coco_pope_random\.json:2: {message}"):
        pope.read_pope(root, images, ["random"])


def test_missing_split_file(tmp_path: Path) -> None:
    root, images = _write_pope(tmp_path)
    with pytest.raises(FileNotFoundError, match="no POPE question file for split 'popular'"):
        pope.read_pope(root, images, ["random", "popular"])


def test_cli_prints_one_line_error_before_loading_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, images = _write_pope(tmp_path)
    (root / "output" / "coco" / "coco_pope_random.json").write_text('{"question_id": 1}\n')
    code = main(["eval", "pope", "--checkpoint", str(tmp_path / "no-such-run"), "--pope-root", str(root),
                 "--images", str(images), "--splits", "random"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "coco_pope_random.json:1: missing field 'image'" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_pope_cli_on_tiny_run(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, images = _write_pope(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "pope", "--checkpoint", str(tiny_run), "--pope-root", str(root), "--images", str(images),
                 "--splits", "random,adversarial", "--out", str(out), "--max-new-tokens", "3",
                 "--batch-size", "4"]) == 0
    for split, rows in QUESTIONS.items():
        answers = [json.loads(line) for line in (out / f"coco_pope_{split}_answers.json").read_text().splitlines()]
        assert [a["question_id"] for a in answers] == [q for q, *_ in rows]
        assert all(isinstance(a["answer"], str) for a in answers)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["splits"]) == ["random", "adversarial"] and set(summary["average"]) == set(pope.METRICS)
    assert pope.score_answer_dir(out, root) == summary
    assert "POPE average accuracy" in capsys.readouterr().out
    assert json.loads((out / "command.json").read_text())["benchmark"] == "pope"
