"""`eval all`: MME + POPE + MMBench in one run and one report, with scores worked out by hand (each benchmark's files
are written by its own test module in the official layout); the one-line errors of every eval command."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from test_mmbench import FIXED, _with_row, _write_tsv
from test_mme import _write_tree
from test_pope import _write_pope

from minigpt4qwen.__main__ import main
from minigpt4qwen.config import ConfigError, load_config
from minigpt4qwen.data.formats import BadSampleError
from minigpt4qwen.data.images import ImageError, ImageProcessor, load_image
from minigpt4qwen.eval import mmbench, mme, pope, suite
from minigpt4qwen.eval.report import EvalOptionError, ask_all
from minigpt4qwen.eval.run import AssistantAnswers


def _files(tmp_path: Path) -> dict:
    root, images = _write_pope(tmp_path)
    return {"mme_root": _write_tree(tmp_path / "MME"), "pope_root": root, "pope_images": images,
            "mmbench_tsv": _write_tsv(tmp_path / "mmbench_dev.tsv")}


def _in_order(answers: list[str]):
    """A fake model answering from a list, in the order asked."""
    asked: list = []

    def answer_fn(batch):
        start = len(asked)
        asked.extend(batch)
        return answers[start : start + len(batch)]

    return answer_fn


# POPE, as in test_pope: random y n y y (TP 2, FP 1, TN 1), adversarial n n (FN 1, TN 1)
POPE_ANSWERS = ["Yes.", "No, there is not.", "yes", "Yes", "no", "no"]


def test_suite_scores_by_hand_and_writes_one_report(tmp_path: Path) -> None:
    data = suite.read_suite(**_files(tmp_path), pope_splits=["random", "adversarial"])
    fakes = {"mme": lambda batch: ["yes"] * len(batch), "pope": _in_order(POPE_ANSWERS), "mmbench": _in_order(FIXED)}
    out = tmp_path / "all"
    combined = suite.evaluate_suite(fakes.__getitem__, data, out, batch_size=4, progress=False, title="of test")

    # MME always yes: every image has a yes and a no question (acc 50, acc+ 0) except commonsense q.jpg (no, no):
    # perception = 3 subtasks x 50; cognition = acc 25 + acc+ 0.
    # POPE: random acc 3/4 F1 0.8, adversarial acc 1/2 F1 0 -> mean accuracy 62.5, mean F1 40.
    # MMBench: q0 and q2 right in every rotation, q1 and q3 not -> 50.
    assert [(r["benchmark"], r["ours"]) for r in combined["headline"]] == [
        ("MME", 150.0), ("MME", 25.0), ("POPE", pytest.approx(40.0)), ("POPE", 62.5), ("MMBench", 50.0)]
    assert combined["headline"][2]["anchors"] == {"LLaVA-1.5-7B": 85.9, "BLIP-2": 85.3}
    assert combined["headline"][4]["anchors"] == {"LLaVA-1.5-7B": 64.3, "InstructBLIP-7B": 36.0}
    counts = {name: (r["questions"], r["asked"]) for name, r in combined["benchmarks"].items()}
    assert counts == {"mme": (14, 14), "pope": (6, 6), "mmbench": (4, 11)}  # MMBench: 4 + 2 + 3 + 2 rotations

    # each benchmark's folder holds its official answer files, which rescore to the same numbers
    assert mme.score_answer_dir(out / "mme") == combined["benchmarks"]["mme"]["summary"]
    assert pope.score_answer_dir(out / "pope", tmp_path / "POPE") == combined["benchmarks"]["pope"]["summary"]
    rescored = mmbench.score_answer_file(out / "mmbench" / "answers.jsonl", tmp_path / "mmbench_dev.tsv")
    assert rescored["overall"] == 50.0 and (out / "mmbench" / "submission.tsv").is_file()

    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(combined))
    md = (out / "summary.md").read_text()
    assert md.startswith("# Evaluation of test\n")
    assert "| Benchmark | Metric | Ours | LLaVA-1.5-7B | BLIP-2 | InstructBLIP-7B |" in md
    assert "| POPE | F1, mean of 2 split(s) | **40.00** | 85.9 | 85.3 |  |" in md
    assert "| MMBench | accuracy (circular) | **50.00** | 64.3 |  | 36.0 |" in md
    assert "| MME | perception (max 2000) | **150.00** |  |  |  |" in md
    assert "| mmbench | 4 | 11 |" in md and "| adversarial | 50.00 | 0.00 | 0.00 | 0.00 | 0.00 |" in md
    with Image.open(out / "scores.png") as png:
        assert png.format == "PNG" and png.width > 300


def test_suite_runs_one_benchmark_and_single_pass(tmp_path: Path) -> None:
    data = suite.read_suite(mmbench_tsv=_write_tsv(tmp_path / "dev.tsv"), circular=False)
    assert data.chosen == ["mmbench"]
    combined = suite.evaluate_suite(lambda _: _in_order(["B", "A", "bird", "I think A is wrong"]), data,
                                    tmp_path / "out", progress=False)
    assert combined["headline"] == [{"benchmark": "MMBench", "metric": "accuracy (single pass)", "ours": 75.0,
                                     "anchors": suite.ANCHORS["mmbench"]}]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "mmbench", "scores.png", "summary.json", "summary.md"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs at least one benchmark"),
        ({"pope_root": "POPE"}, "--pope-root and --images go together"),
        ({"pope_root": "POPE", "pope_images": "val2014", "pope_splits": ["random", "easy"]}, "--splits takes"),
    ],
)
def test_read_suite_rejects_options(kwargs: dict, message: str) -> None:
    with pytest.raises(EvalOptionError, match=message):
        suite.read_suite(**kwargs)


def test_ask_all_prepares_the_next_batch_through_load(tmp_path: Path) -> None:
    """An answer function with load() gets its images through it, in order; a failing load surfaces its error."""
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4 + i, 4), "red").save(paths[-1])

    class Answers:
        def __init__(self) -> None:
            self.seen: list = []

        def __call__(self, batch):
            self.seen.extend(batch)
            return [f"{image.width}:{prompt}" for image, prompt in batch]

        def load(self, image):
            return load_image(image)

    answers = Answers()
    assert ask_all(answers, [(p, str(i)) for i, p in enumerate(paths)], 2, "t", False) == [
        "4:0", "5:1", "6:2", "7:3", "8:4"]
    assert all(isinstance(image, Image.Image) for image, _ in answers.seen)
    with pytest.raises(ImageError, match="missing.png not found"):
        ask_all(answers, [(tmp_path / "missing.png", "q")], 2, "t", False)


def test_assistant_load_makes_the_tensor_the_processor_would_make(tmp_path: Path) -> None:
    """load() prepares the model's input ahead in a thread: exactly the tensor the processor makes from the file,
    which the assistant then takes as it is (a training-time processor, random crops, still gets the image)."""
    path = tmp_path / "photo.jpg"
    Image.radial_gradient("L").convert("RGB").resize((77, 50)).save(path)
    processor = ImageProcessor(16, train=False)
    answers = AssistantAnswers(SimpleNamespace(processor=processor), max_new_tokens=2)
    loaded = answers.load(path)
    assert loaded.shape == (3, 16, 16) and loaded.equal(processor(load_image(path)))
    from minigpt4qwen.serve.generate import Assistant

    assistant = SimpleNamespace(processor=processor)
    assert Assistant._pixels(assistant, [loaded])[0] is loaded
    assert Assistant._pixels(assistant, [path])[0].equal(loaded)
    train = AssistantAnswers(SimpleNamespace(processor=ImageProcessor(16, train=True)), max_new_tokens=2)
    assert isinstance(train.load(path), Image.Image)


def test_eval_all_cli_on_tiny_run(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _files(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "all", "--checkpoint", str(tiny_run), "--mme-root", str(files["mme_root"]),
                 "--pope-root", str(files["pope_root"]), "--images", str(files["pope_images"]),
                 "--splits", "random,adversarial", "--tsv", str(files["mmbench_tsv"]), "--out", str(out),
                 "--max-new-tokens", "2", "--batch-size", "8"]) == 0
    combined = json.loads((out / "summary.json").read_text())
    assert list(combined["benchmarks"]) == ["mme", "pope", "mmbench"]
    assert mme.score_answer_dir(out / "mme") == combined["benchmarks"]["mme"]["summary"]
    assert pope.score_answer_dir(out / "pope", files["pope_root"]) == combined["benchmarks"]["pope"]["summary"]
    answers = (out / "mmbench" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 11 and combined["benchmarks"]["mmbench"]["asked"] == 11
    assert (out / "scores.png").is_file() and "| POPE | F1" in (out / "summary.md").read_text()
    assert "3 benchmark(s) in" in capsys.readouterr().out
    assert json.loads((out / "command.json").read_text())["benchmark"] == "all"


# --------------------------------------------------------------------------------------------- one-line errors


def _bad_mme(tmp_path: Path) -> Path:
    root = _write_tree(tmp_path / "MME")
    (root / "count" / "0001.txt").write_text("Are there two apples?\tyes\nAre there three apples?\tmaybe\n")
    return root


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (lambda t: ["mme", "--mme-root", str(_bad_mme(t))],
         "count/0001.txt:2: ground truth must be yes or no, got 'maybe'"),
        (lambda t: ["mme", "--mme-root", str(_write_tree(t / "MME")), "--batch-size", "0"],
         "--batch-size must be >= 1, got 0"),
        (lambda t: ["pope", "--pope-root", str(_write_pope(t)[0]), "--images", str(t / "val2014"),
                    "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (lambda t: ["pope", "--pope-root", str(_write_pope(t)[0]), "--images", str(t / "val2014"),
                    "--splits", "random,hard"], "--splits takes random, popular, adversarial"),
        (lambda t: ["mmbench", "--tsv", str(_write_tsv(t / "dev.tsv")), "--batch-size", "-1"],
         "--batch-size must be >= 1, got -1"),
        (lambda t: ["all", "--tsv", str(_with_row(t / "bad.tsv", 3, answer="E"))],
         "bad.tsv:5 (index 3): answer 'E' is not one of the options A, B"),
        (lambda t: ["all", "--mme-root", str(_bad_mme(t))], "count/0001.txt:2: ground truth must be yes or no"),
        (lambda t: ["all", "--batch-size", "0", "--tsv", str(_write_tsv(t / "dev.tsv"))], "--batch-size must be >= 1"),
        (lambda t: ["all"], "eval all needs at least one benchmark"),
        (lambda t: ["all", "--tsv", str(_write_tsv(t / "dev.tsv")), "--images", str(t)],
         "--pope-root and --images go together"),
    ],
)
def test_every_eval_command_reports_bad_input_in_one_line_before_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv, message: str) -> None:
    # the checkpoint does not exist: the error must come before any model is loaded
    code = main(["eval", *argv(tmp_path), "--checkpoint", str(tmp_path / "no-such-run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_rescoring_commands_report_bad_files_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "existence.txt").write_text("a.jpg\tQ?\tyes\tyes\nb.jpg\tQ?\tyes\n")
    tsv = _write_tsv(tmp_path / "dev.tsv")
    (tmp_path / "answers.jsonl").write_text('{"question_id": 0, "round_id": "first", "text": "A"}\n')
    pope_root, _ = _write_pope(tmp_path / "p")
    (tmp_path / "coco_pope_random_answers.json").write_text('{"question_id": 1, "answer": "yes"}\n')
    (tmp_path / "short.jsonl").write_text('{"question_id": 0, "round_id": 0, "text": "B"}\n')
    cases = [
        (mme.main, [str(tmp_path)], "existence.txt:2: expected 4 tab-separated fields, got 3"),
        (mmbench.main, [str(tmp_path / "answers.jsonl"), "--tsv", str(tsv)],
         "answers.jsonl:1: round_id must be an integer >= 0, got 'first'"),
        (mmbench.main, [str(tmp_path / "short.jsonl"), "--tsv", str(tsv)],
         "dev.tsv:2 (index 0): need 4 answer(s) (one per rotation of its options), got 1"),
        (pope.main, [str(tmp_path), "--pope-root", str(pope_root)], "1 answers for 4 questions"),
    ]
    for fn, argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            fn(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1


def test_mme_rows_that_do_not_pair_are_a_file_error(tmp_path: Path) -> None:
    (tmp_path / "OCR.txt").write_text("a.jpg\tQ?\tyes\tyes\nb.jpg\tQ?\tno\tno\n")
    with pytest.raises(BadSampleError, match=r"OCR: rows 1-2 mix images"):
        mme.score_answer_dir(tmp_path)


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.pope_root=POPE", "pope_root and pope_images go together"),
        ("eval.pope_splits=[random, hard]", "pope_splits takes a non-empty list of random, popular, adversarial"),
        ("eval.batch_size=0", "batch_size and max_new_tokens must be >= 1"),
        ("eval.every_n_epochs=-1", "every_n_epochs must be >= 0"),
    ],
)
def test_eval_config_checks(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"eval: {message}"):
        load_config(None, [override])
