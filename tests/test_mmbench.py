"""MMBench evaluator on a TSV in the official layout, with circular scores worked out by hand below."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from minigpt4qwen.__main__ import main
from minigpt4qwen.data.formats import BadSampleError
from minigpt4qwen.eval import mmbench

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
          "comment", "split"]


def _png(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# index, question, hint, options A-D ('' = empty), answer, category, image, l2-category
ROWS = [
    ("0", "What color is the ball?", "Look at the ball.", ("red", "blue", "green", "yellow"), "B", "color",
     _png("blue"), "attribute"),
    ("1", "How many balls are there?", "", ("two", "three", "", ""), "A", "count", _png("red"), "attribute"),
    ("2", "Which animal is shown?", "", ("cat", "dog", "bird", ""), "C", "color", "0", "object"),  # image of row 0
    ("3", "Is the ball round?", "", ("yes", "no", "", ""), "B", "count", _png("green"), "object"),
]


def _write_tsv(path: Path, rows=ROWS) -> Path:
    lines = ["\t".join(HEADER)]
    for index, question, hint, options, answer, category, image, l2 in rows:
        lines.append("\t".join([index, question, hint, *options, answer, category, image, "src", l2, "", "dev"]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("text", "options", "letter"),
    [
        ("A", ("x", "y"), "A"),
        ("B.", ("x", "y"), "B"),
        ("(C)", ("x", "y", "z"), "C"),
        ("The answer is B", ("x", "y"), "B"),
        ("(D) blue", ("a", "b", "c", "blue"), "D"),
        ("D", ("x", "y", "z"), None),  # no option D here
        ("B or C", ("x", "y", "z"), None),
        ("A cat sits on the mat", ("dog", "cat"), None),  # 'A' is an article in a long answer
        ("a", ("x", "y"), None),
        ("Cat.", ("dog", "cat"), "B"),  # exact match on an option's text
        ("a cat", ("dog", "cat"), None),  # text must match exactly, not be contained
    ],
)
def test_extract_choice(text: str, options: tuple[str, ...], letter: str | None) -> None:
    assert mmbench.extract_choice(text, options) == letter


def test_prompt_is_llavas() -> None:
    assert mmbench.build_prompt("Q?", "Hint.", ("x", "y", "z")) == (
        "Hint.\nQ?\nA. x\nB. y\nC. z\nAnswer with the option's letter from the given choices directly.")
    assert mmbench.build_prompt("Q?", None, ("x", "y")).startswith("Q?\nA. x\nB. y\n")


def test_read_and_rotate(tmp_path: Path) -> None:
    questions = mmbench.read_mmbench(_write_tsv(tmp_path / "mmbench_dev.tsv"))
    assert [(q.index, q.options, q.answer, q.hint) for q in questions] == [
        ("0", ("red", "blue", "green", "yellow"), "B", "Look at the ball."),
        ("1", ("two", "three"), "A", None),
        ("2", ("cat", "dog", "bird"), "C", None),
        ("3", ("yes", "no"), "B", None),
    ]
    assert questions[2].image == questions[0].image  # a short 'image' cell naming another row reuses its image
    assert questions[0].pil_image().getpixel((0, 0)) == (0, 0, 255)
    # Option r moves to A in round r; the right text (blue) is then at B, A, D, C.
    assert mmbench.rotations(questions[0]) == [
        (("red", "blue", "green", "yellow"), "B"),
        (("blue", "green", "yellow", "red"), "A"),
        (("green", "yellow", "red", "blue"), "D"),
        (("yellow", "red", "blue", "green"), "C"),
    ]
    assert mmbench.rotations(questions[0], circular=False) == [(("red", "blue", "green", "yellow"), "B")]


# One answer per question and rotation, in the order asked:
FIXED = [
    "B", "A.", "(D) blue", "The answer is C",  # q0: right in all 4 rotations
    "A", "A",  # q1: right in round 0 (A = two), wrong in round 1 (two is then B)
    "bird", "Bird.", "bird",  # q2: right in all 3 rotations through the option text
    "I think A is wrong", "A",  # q3: round 0 has no readable letter, round 1 right (no is then A)
]


def _fake(answers: list[str], batches: list):
    def answer_fn(batch):
        start = sum(len(b) for b in batches)
        batches.append(batch)
        return answers[start : start + len(batch)]

    return answer_fn


def test_circular_scores_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv")
    batches: list = []
    out = tmp_path / "out"
    summary = mmbench.evaluate_mmbench(_fake(FIXED, batches), mmbench.read_mmbench(tsv), out, batch_size=4,
                                       progress=False)
    assert [len(b) for b in batches] == [4, 4, 3]
    image, prompt = batches[0][1]
    assert isinstance(image, Image.Image)
    assert prompt == ("Look at the ball.\nWhat color is the ball?\nA. blue\nB. green\nC. yellow\nD. red\n"
                      + mmbench.ANSWER_HINT)
    # q0 and q2 right in every rotation, q1 and q3 not: 2/4. Round 0 alone: q0, q1, q2 right: 3/4.
    assert summary["overall"] == 50.0 and summary["first_round"] == 75.0
    assert summary["scored"] == 4 and summary["unscored"] == 0 and summary["unparsed_answers"] == 1
    assert summary["categories"] == {"color": {"accuracy": 100.0, "n": 2}, "count": {"accuracy": 0.0, "n": 2}}
    assert summary["l2_categories"] == {"attribute": {"accuracy": 50.0, "n": 2}, "object": {"accuracy": 50.0, "n": 2}}

    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 11
    assert lines[2] == {
        "question_id": 0, "round_id": 2, "prompt": "Look at the ball.\nWhat color is the ball?\nA. green\nB. yellow\n"
        "C. red\nD. blue\n" + mmbench.ANSWER_HINT, "text": "(D) blue", "options": ["green", "yellow", "red", "blue"],
        "option_char": ["C", "D", "A", "B"], "prediction": "D"}
    submission = (out / "submission.tsv").read_text().splitlines()
    assert submission[0].split("\t") == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert submission[1].split("\t") == ["0", "What color is the ball?", "red", "blue", "green", "yellow", "B", "B",
                                         "dev"]
    assert submission[4].split("\t")[6] == "I think A is wrong"
    from openpyxl import load_workbook

    sheet = load_workbook(out / "submission.xlsx", read_only=True).active  # the file MMBench's server takes
    cells = [["" if v is None else str(v) for v in row] for row in sheet.iter_rows(values_only=True)]
    assert cells == [line.split("\t") for line in submission]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "| color | 100.00 | 2 |" in (out / "summary.md").read_text()

    mmbench.main([str(out / "answers.jsonl"), "--tsv", str(tsv)])
    assert "**50.00** over 4 questions" in capsys.readouterr().out


def test_single_pass_and_test_split(tmp_path: Path) -> None:
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv")
    questions = mmbench.read_mmbench(tsv)
    batches: list = []
    summary = mmbench.evaluate_mmbench(_fake(["B", "A", "bird", "I think A is wrong"], batches), questions,
                                       tmp_path / "single", circular=False, progress=False)
    assert summary["overall"] == 75.0 and summary["first_round"] == 75.0 and not summary["circular"]
    # The test split has no answer column: nothing to score, the submission file is still written.
    rows = [(i, q, h, o, "", c, img, l2) for i, q, h, o, _, c, img, l2 in ROWS]
    test_questions = mmbench.read_mmbench(_write_tsv(tmp_path / "mmbench_test.tsv", rows))
    summary = mmbench.evaluate_mmbench(_fake(FIXED, []), test_questions, tmp_path / "test", progress=False)
    assert summary["overall"] is None and summary["unscored"] == 4
    assert "submission file only" in mmbench.format_table(summary)
    assert len((tmp_path / "test" / "submission.tsv").read_text().splitlines()) == 5


def _with_row(path: Path, index: int, **changes) -> Path:
    rows = [list(r) for r in ROWS]
    fields = {"question": 1, "options": 3, "answer": 4, "image": 6}
    for key, value in changes.items():
        rows[index][fields[key]] = value
    return _write_tsv(path, [tuple(r) for r in rows])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image": "not base64!"}, r":3 \(index 1\): column 'image' is not valid base64"),
        ({"image": base64.b64encode(b"no image here" * 8).decode()}, r":3 \(index 1\): column 'image' decodes to no"),
        ({"answer": "C"}, r":3 \(index 1\): answer 'C' is not one of the options A, B"),
        ({"options": ("two", "", "", "")}, r":3 \(index 1\): needs at least options A and B"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, changes: dict, message: str) -> None:
    path = _with_row(tmp_path / "bad.tsv", 1, **changes)
    with pytest.raises(BadSampleError, match=r"bad\.tsv" + message):
        mmbench.read_mmbench(path)


def test_short_row_and_missing_column(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "bad.tsv")
    lines = path.read_text().splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:5])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match=r"bad\.tsv:3: 5 tab-separated fields, the header has 14"):
        mmbench.read_mmbench(path)
    lines[2] = lines[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match=r"bad\.tsv:3 \(index 0\): the index repeats"):
        mmbench.read_mmbench(path)
    path.write_text("index\tquestion\tA\tB\n0\tQ?\tx\ty\n")
    with pytest.raises(BadSampleError, match=r"bad\.tsv:1: header lacks column\(s\) image"):
        mmbench.read_mmbench(path)


def test_cli_prints_one_line_error_before_loading_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _with_row(tmp_path / "bad.tsv", 2, image="@@@")
    code = main(["eval", "mmbench", "--checkpoint", str(tmp_path / "no-such-run"), "--tsv", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "bad.tsv:4 (index 2): column 'image' is not valid" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_mmbench_cli_on_tiny_run(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv")
    out = tmp_path / "out"
    assert main(["eval", "mmbench", "--checkpoint", str(tiny_run), "--tsv", str(tsv), "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "4"]) == 0
    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["round_id"]) for a in lines] == [
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 4 and 0.0 <= summary["overall"] <= 100.0
    assert set(summary["categories"]) == {"color", "count"}
    assert len((out / "submission.tsv").read_text().splitlines()) == 5
    assert "MMBench accuracy" in capsys.readouterr().out


def test_answers_with_control_characters_still_give_a_submission(tmp_path: Path) -> None:
    """A model may answer with any token, control characters included (a random 7B did): the worksheet gets the
    answer without them instead of the whole evaluation failing at its last step."""
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv")
    answers = ["B\x14", "A", "bird\x00\x1f", "C"]
    mmbench.evaluate_mmbench(_fake(answers, []), mmbench.read_mmbench(tsv), tmp_path / "out", circular=False,
                             progress=False)
    from openpyxl import load_workbook

    sheet = load_workbook(tmp_path / "out" / "submission.xlsx", read_only=True).active
    predictions = [row[6] for row in sheet.iter_rows(values_only=True)][1:]
    assert predictions == ["B", "A", "bird", "C"]
