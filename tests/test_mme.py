"""MME evaluator on hand-built trees and answer files whose scores are worked out by hand below."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from minigpt4qwen.eval import mme
from minigpt4qwen.eval.mme import AnswerRow

# subtask -> (layout, {image file: [(question, truth as written in the file), ...]})
TREE = {
    "existence": (
        "flat",
        {
            "a.jpg": [
                ("Is there a cat in this image? Please answer yes or no.", "Yes"),
                ("Is there a dog in this image? Please answer yes or no.", "No"),
            ],
            "b.png": [
                ("Is there a car? Please answer yes or no.", "yes"),
                ("Is there a bus? Please answer yes or no.", "no"),
            ],
            "c.jpeg": [("Is it red?", "YES"), ("Is it blue?", "no")],
        },
    ),
    "count": ("flat", {"0001.jpg": [("Are there two apples?", "yes"), ("Are there three apples?", "no")]}),
    "artwork": ("split", {"x.jpg": [("Is this by Monet?", "yes"), ("Is this by Dali?", "no")]}),
    "commonsense_reasoning": (
        "flat",
        {
            "p.png": [("Should I bring an umbrella?", "yes"), ("Is it sunny?", "no")],
            "q.jpg": [("Is the light green?", "no"), ("Can I cross?", "no")],
        },
    ),
}


def _write_tree(root: Path, tree: dict = TREE) -> Path:
    """MME layout by hand; CRLF and trailing spaces in one file because the released files are not uniform."""
    for subtask, (layout, images) in tree.items():
        image_dir = root / subtask / "images" if layout == "split" else root / subtask
        text_dir = root / subtask / "questions_answers_YN" if layout == "split" else root / subtask
        image_dir.mkdir(parents=True, exist_ok=True)
        text_dir.mkdir(parents=True, exist_ok=True)
        for name, questions in images.items():
            Image.new("RGB", (8, 8), "red").save(image_dir / name)
            newline = "\r\n" if name == "a.jpg" else "\n"
            text = newline.join(f"{q}\t{a}  " for q, a in questions) + newline
            (text_dir / f"{Path(name).stem}.txt").write_bytes(text.encode())
    (root / "eval_tool").mkdir()
    return root


def _rows(image_preds: list[tuple[str, list[tuple[str, str]]]]) -> list[AnswerRow]:
    return [
        AnswerRow(image, f"q{i}", truth, pred) for image, pairs in image_preds for i, (truth, pred) in enumerate(pairs)
    ]


# 3 images, 6 questions: 4 right, only img1 has both right -> acc 66.67, acc+ 33.33, score 100; "maybe" is other.
HAND_ROWS = _rows(
    [
        ("img1.jpg", [("yes", "Yes."), ("no", "No, there is not")]),
        ("img2.jpg", [("yes", "yes"), ("no", "maybe")]),
        ("img3.jpg", [("no", "Nope"), ("yes", "The answer is yes")]),
    ]
)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("  NO \n", "no"),
        ("No, there is not", "no"),
        ("Nope", "no"),
        ("The answer is yes", "other"),
        ("I think yes", "other"),
        ("I yes", "other"),
        ("I'm no expert", "other"),
        ("a no", "no"),
        ("", "other"),
        ("maybe", "other"),
        ("not sure", "no"),
        ("yesno", "yes"),
    ],
)
def test_parse_prediction_follows_mme(text: str, label: str) -> None:
    assert mme.parse_prediction(text) == label


def test_score_subtask_by_hand() -> None:
    scores = mme.score_subtask(HAND_ROWS)
    assert scores["acc"] == pytest.approx(400 / 6)
    assert scores["acc_plus"] == pytest.approx(100 / 3)
    assert scores["score"] == pytest.approx(100.0)
    assert scores["other"] == 2


def test_score_subtask_rejects_broken_pairs() -> None:
    with pytest.raises(ValueError, match="mix images"):
        mme.score_subtask([HAND_ROWS[0], HAND_ROWS[2]])
    with pytest.raises(ValueError, match="2 answer rows per image"):
        mme.score_subtask(HAND_ROWS[:3])


def test_read_mme_both_layouts_sorted_and_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=mme.__name__):
        data = mme.read_mme(_write_tree(tmp_path))
    assert list(data) == ["existence", "count", "artwork", "commonsense_reasoning"]
    existence = data["existence"]
    assert [(i.image_name, i.truth) for i in existence] == [
        ("a.jpg", "yes"),
        ("a.jpg", "no"),
        ("b.png", "yes"),
        ("b.png", "no"),
        ("c.jpeg", "yes"),
        ("c.jpeg", "no"),
    ]
    assert existence[0].question == "Is there a cat in this image? Please answer yes or no."
    assert data["artwork"][0].image == tmp_path / "artwork" / "images" / "x.jpg"
    assert all(item.image.is_file() for items in data.values() for item in items)
    assert "eval_tool" in caplog.text and "position" in caplog.text
    assert mme.missing_subtasks(data)[:3] == ["position", "color", "posters"]
    assert len(mme.missing_subtasks(data)) == 10


def test_read_mme_errors_name_file_and_line(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    bad = tmp_path / "count" / "0001.txt"
    bad.write_text("Are there two apples?\tyes\nAre there three apples? no\n")
    with pytest.raises(ValueError, match=r"0001\.txt:2"):
        mme.read_mme(tmp_path)
    bad.write_text("Are there two apples?\tyes\nAre there three apples?\tperhaps\n")
    with pytest.raises(ValueError, match=r"0001\.txt:2.*yes or no"):
        mme.read_mme(tmp_path)
    bad.unlink()
    (tmp_path / "count" / "0002.txt").write_text("Q?\tyes\nQ2?\tno\n")
    with pytest.raises(FileNotFoundError, match=r"0002\.txt: no image"):
        mme.read_mme(tmp_path)
    with pytest.raises(FileNotFoundError, match="no MME subtask"):
        mme.read_mme(tmp_path / "eval_tool")


def _write_answer_file(folder: Path, subtask: str, rows: list[AnswerRow]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{r.image}\t{r.question}\t{r.truth.capitalize()}\t{r.prediction}" for r in rows]
    (folder / f"{subtask}.txt").write_text("\n".join(lines) + "\n")


def test_score_answer_dir_totals(tmp_path: Path) -> None:
    _write_answer_file(tmp_path, "existence", HAND_ROWS)  # 100
    _write_answer_file(tmp_path, "count", _rows([("c.jpg", [("yes", "no"), ("no", "yes")])]))  # 0
    _write_answer_file(tmp_path, "code_reasoning", _rows([("k.png", [("yes", "yes"), ("no", "no")])]))  # 200
    _write_answer_file(tmp_path, "text_translation", _rows([("t.png", [("yes", "yes"), ("no", "yes")])]))  # 50
    (tmp_path / "notes.txt").write_text("not an answer file\n")
    summary = mme.score_answer_dir(tmp_path)
    assert summary["perception"] == pytest.approx(100.0)
    assert summary["cognition"] == pytest.approx(250.0)
    assert list(summary["subtasks"]) == ["existence", "count", "text_translation", "code_reasoning"]
    assert summary["subtasks"]["text_translation"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "other": 0}
    assert "commonsense_reasoning" in summary["missing"] and "existence" not in summary["missing"]
    assert len(summary["missing"]) == 10
    table = mme.format_table(summary)
    assert "| existence | 66.67 | 33.33 | 100.00 | 2 |" in table
    assert "**Perception** (max 2000) | | | **100.00**" in table and "**250.00**" in table
    assert "Missing subtasks (not scored): position" in table


def test_score_answer_dir_rejects_malformed_line(tmp_path: Path) -> None:
    (tmp_path / "color.txt").write_text("a.jpg\tQ?\tyes\tyes\na.jpg\tQ?\tno\n")
    with pytest.raises(ValueError, match=r"color\.txt:2: expected 4"):
        mme.score_answer_dir(tmp_path)


def test_evaluate_mme_writes_mme_format_and_rescores(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "MME")
    # Right on everything except existence/b.png's second question; a multi-line, tabbed answer must stay one line.
    wrong = {("b.png", "Is there a bus? Please answer yes or no.")}
    truth = {(i.image_name, i.question): i.truth for items in mme.read_mme(root).values() for i in items}
    batches = []

    def answer_fn(batch: list[tuple[Path, str]]) -> list[str]:
        batches.append(batch)
        out = []
        for image, prompt in batch:
            question = prompt.removesuffix(" " + mme.DEFAULT_SUFFIX)
            answer = truth[(image.name, question)]
            out.append("yes\tbut\r\nreally" if (image.name, question) in wrong else answer.capitalize())
        return out

    summary = mme.evaluate_mme(answer_fn, root, tmp_path / "out", batch_size=4, progress=False)
    assert [len(b) for b in batches] == [4, 4, 4, 2]  # 14 questions; batches cross subtask borders
    assert batches[0][0] == (
        root / "existence" / "a.jpg",
        "Is there a cat in this image? Please answer yes or no. " + mme.DEFAULT_SUFFIX,
    )
    # existence: 5/6 right, 2/3 images -> 83.33 + 66.67 = 150; count and artwork 200 each; commonsense 200.
    assert summary["perception"] == pytest.approx(550.0)
    assert summary["cognition"] == pytest.approx(200.0)
    assert summary["subtasks"]["existence"]["score"] == pytest.approx(150.0)

    out = tmp_path / "out"
    assert (out / "existence.txt").read_text().splitlines() == [
        "a.jpg\tIs there a cat in this image? Please answer yes or no.\tyes\tYes",
        "a.jpg\tIs there a dog in this image? Please answer yes or no.\tno\tNo",
        "b.png\tIs there a car? Please answer yes or no.\tyes\tYes",
        "b.png\tIs there a bus? Please answer yes or no.\tno\tyes but really",
        "c.jpeg\tIs it red?\tyes\tYes",
        "c.jpeg\tIs it blue?\tno\tNo",
    ]
    assert (out / "artwork.txt").read_text() == "x.jpg\tIs this by Monet?\tyes\tYes\nx.jpg\tIs this by Dali?\tno\tNo\n"
    assert mme.score_answer_dir(out) == summary
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "summary.md").read_text() == mme.format_table(summary)
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_mme_always_yes_without_suffix(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "MME")
    prompts = []

    def always_yes(batch: list[tuple[Path, str]]) -> list[str]:
        prompts.extend(prompt for _, prompt in batch)
        return ["yes"] * len(batch)

    summary = mme.evaluate_mme(always_yes, root, tmp_path / "out", prompt_suffix="", progress=False)
    assert prompts[0] == "Is there a cat in this image? Please answer yes or no."
    # Every image has a yes and a no question except q.jpg (no, no): acc 50 and acc+ 0 everywhere else.
    assert summary["perception"] == pytest.approx(150.0)
    assert summary["subtasks"]["commonsense_reasoning"] == {"acc": 25.0, "acc_plus": 0.0, "score": 25.0, "other": 0}
    assert mme.score_answer_dir(tmp_path / "out") == summary


def test_evaluate_mme_checks_answer_count(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "MME")
    with pytest.raises(ValueError, match="must return 3 strings"):
        mme.evaluate_mme(lambda batch: ["yes"], root, tmp_path / "out", batch_size=3, progress=False)


def test_spread_and_summarize_guard() -> None:
    runs = [
        {"perception": 1400.0, "cognition": 300.0},
        {"perception": 1420.0, "cognition": 280.0},
        {"perception": 1410.0, "cognition": 290.0},
    ]
    result = mme.spread(runs)
    assert result["runs"] == 3
    assert result["perception"] == {"mean": 1410.0, "min": 1400.0, "max": 1420.0, "std": pytest.approx(10.0)}
    assert result["cognition"]["std"] == pytest.approx(10.0)
    assert mme.spread(runs[:1])["perception"]["std"] == 0.0
    with pytest.raises(ValueError, match="unknown MME subtask"):
        mme.summarize({"hallucination": HAND_ROWS})


def test_rescore_command_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_answer_file(tmp_path, "OCR", HAND_ROWS)
    mme.main([str(tmp_path)])
    assert "| OCR | 66.67 | 33.33 | 100.00 | 2 |" in capsys.readouterr().out
