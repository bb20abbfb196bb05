"""POPE object-hallucination benchmark (random / popular / adversarial), scored like POPE's own ``evaluate.py``.

    minigpt4qwen eval pope --checkpoint RUN_DIR --pope-root DIR --images COCO/val2014 [--splits random,popular]

Question files are POPE's own JSON lines (``coco_pope_<split>.json``: ``question_id``, ``image``, ``text``, ``label``);
answers are parsed with POPE's rule and written as ``coco_pope_<split>_answers.json`` (JSON lines,
``question_id`` + ``answer``, in question order) so POPE's script rescores them with
``python evaluate.py --ans-file coco_pope_random_answers.json --label-file coco_pope_random.json``.
Rescore an answer folder here with ``python -m minigpt4qwen.eval.pope ANSWER_DIR --pope-root DIR``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import POPE_SPLITS
from ..data.formats import BadSampleError, json_object
from .mme import DEFAULT_SUFFIX, build_prompt
from .report import AnswerFn, ask_all, one_line_errors, write_summary

SPLITS = POPE_SPLITS
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# Where the question files sit: POPE's repo keeps them in output/coco/, LLaVA's playground in pope/coco/.
_PLACES = (".", "coco", "output/coco")


@dataclass(frozen=True)
class Question:
    """One POPE question as released: its id, COCO image, question text and yes/no label."""

    question_id: int | str
    image: Path
    text: str
    label: str


def question_file(pope_root: str | Path, split: str) -> Path:
    """``coco_pope_<split>.json`` in the root, its ``coco/`` or POPE's own ``output/coco/``."""
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; choose from {', '.join(SPLITS)}")
    root = Path(pope_root)
    tried = [root / place / f"coco_pope_{split}.json" for place in _PLACES]
    for path in tried:
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(f"no POPE question file for split {split!r}; looked for {', '.join(map(str, tried))}")


def _json_lines(path: Path) -> Iterable[tuple[str, dict]]:
    """(``file:line``, object) for each non-blank line; a line that is no JSON object names itself."""
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json_object(line)
        except ValueError as exc:
            raise BadSampleError(f"{where}: {exc}") from None


def _field(row: dict, key: str, where: str, kinds: tuple[type, ...] = (str,)):
    if key not in row:
        raise BadSampleError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise BadSampleError(f"{where}: field '{key}' must be {' or '.join(k.__name__ for k in kinds)}, "
                             f"got {type(value).__name__}")
    return value


def read_split(path: str | Path, images: str | Path | None) -> list[Question]:
    """All questions of one POPE file in file order; with ``images`` set, every image must exist there."""
    path = Path(path)
    questions = []
    for where, row in _json_lines(path):
        qid = _field(row, "question_id", where, (int, str))
        image = _field(row, "image", where)
        text = _field(row, "text", where)
        label = _field(row, "label", where).strip().lower()
        if label not in ("yes", "no"):
            raise BadSampleError(f"{where}: label must be yes or no, got {row['label']!r}")
        image_path = Path(images) / image if images is not None else Path(image)
        if images is not None and not image_path.is_file():
            raise BadSampleError(f"{where}: image {image} not found in {images}")
        questions.append(Question(qid, image_path, text, label))
    if not questions:
        raise BadSampleError(f"{path}: no questions")
    return questions


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def parse_answer(text: str) -> str:
    """POPE's rule: first sentence, commas dropped, split on spaces; 'No', 'not' or 'no' as a word -> no, else yes.

    Kept exactly, quirks included: "NO" and "Nope" count as yes, and an empty answer is a yes.
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def score(answers: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 (yes = positive) and yes-ratio as fractions, plus the confusion counts.

    POPE's script divides by zero when the model never says yes; here precision (and F1) is then 0.0.
    """
    if len(answers) != len(labels) or not labels:
        raise ValueError(f"need one answer per label, got {len(answers)} answers for {len(labels)} labels")
    preds = [parse_answer(a) for a in answers]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(preds, labels))
    fn = len(labels) - tp - fp - tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": preds.count("yes") / len(preds),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n": len(labels),
    }


def summarize(per_split: Mapping[str, Mapping]) -> dict:
    """Per-split scores in POPE's split order and the unweighted mean of each metric over the splits present."""
    splits = {name: dict(per_split[name]) for name in SPLITS if name in per_split}
    average = {key: statistics.fmean(s[key] for s in splits.values()) for key in METRICS}
    return {"splits": splits, "average": average}


def format_table(summary: Mapping) -> str:
    """Markdown table in percent (as papers report POPE), one row per split and the average."""
    lines = ["| Split | Accuracy | Precision | Recall | F1 | Yes-ratio |", "|---|---:|---:|---:|---:|---:|"]
    rows = [*summary["splits"].items(), ("**average**", summary["average"])]
    for name, s in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * s[key]:.2f}" for key in METRICS) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Answer files


def answer_file_name(split: str) -> str:
    return f"coco_pope_{split}_answers.json"


def write_answers(path: str | Path, questions: Sequence[Question], answers: Sequence[str]) -> None:
    """POPE's answer format: JSON lines in question order (its script pairs answers with labels by position)."""
    lines = [json.dumps({"question_id": q.question_id, "answer": a}, ensure_ascii=False) + "\n"
             for q, a in zip(questions, answers, strict=True)]
    Path(path).write_text("".join(lines), encoding="utf-8")


def read_answers(path: str | Path, questions: Sequence[Question]) -> list[str]:
    """Answers of one answer file, checked line by line against the question file they answer."""
    path = Path(path)
    rows = list(_json_lines(path))
    if len(rows) != len(questions):
        raise BadSampleError(f"{path}: {len(rows)} answers for {len(questions)} questions")
    answers = []
    for (where, row), question in zip(rows, questions):
        answer = _field(row, "answer", where)
        if "question_id" in row and row["question_id"] != question.question_id:
            raise BadSampleError(f"{where}: question_id {row['question_id']!r} where the question file has "
                                 f"{question.question_id!r}")
        answers.append(answer)
    return answers


def score_answer_dir(answer_dir: str | Path, pope_root: str | Path) -> dict:
    """Rescore ``coco_pope_<split>_answers.json`` files against the question files under ``pope_root``."""
    answer_dir = Path(answer_dir)
    per_split = {}
    for split in SPLITS:
        path = answer_dir / answer_file_name(split)
        if path.is_file():
            questions = read_split(question_file(pope_root, split), None)
            per_split[split] = score(read_answers(path, questions), [q.label for q in questions])
    if not per_split:
        raise FileNotFoundError(f"no POPE answer file (coco_pope_<split>_answers.json) in {answer_dir}")
    return summarize(per_split)


# ---------------------------------------------------------------------------------------------------------------------
# Running a model


def read_pope(pope_root: str | Path, images: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, list[Question]]:
    """The chosen splits' questions, every image checked, so a broken row fails before any model is loaded."""
    if not splits:
        raise ValueError("no POPE split chosen")
    return {split: read_split(question_file(pope_root, split), images) for split in dict.fromkeys(splits)}


def evaluate_pope(
    answer_fn: AnswerFn,
    data: Mapping[str, Sequence[Question]],
    out_dir: str | Path,
    batch_size: int = 16,
    prompt_suffix: str | None = DEFAULT_SUFFIX,
    progress: bool = True,
) -> dict:
    """Ask every question of ``read_pope``'s splits, write POPE answer files and the summary, return the summary.

    Batches cross split borders; the released question text is kept verbatim and the suffix follows, as for MME.
    """
    questions = [q for split in data for q in data[split]]
    answers = ask_all(answer_fn, [(q.image, build_prompt(q.text, prompt_suffix)) for q in questions], batch_size,
                      "POPE", progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_split, start = {}, 0
    for split, items in data.items():
        mine = answers[start : start + len(items)]
        start += len(items)
        write_answers(out_dir / answer_file_name(split), items, mine)
        per_split[split] = score(mine, [q.label for q in items])
    summary = summarize(per_split)
    write_summary(out_dir, summary, format_table(summary))
    return summary


@one_line_errors
def main(argv: Sequence[str] | None = None) -> None:
    """Rescore a folder of POPE answer files and print the table."""
    parser = argparse.ArgumentParser(prog="python -m minigpt4qwen.eval.pope", description=main.__doc__)
    parser.add_argument("answer_dir", type=Path, help="folder holding coco_pope_<split>_answers.json files")
    parser.add_argument("--pope-root", required=True, type=Path, help="folder holding coco_pope_<split>.json")
    args = parser.parse_args(argv)
    print(format_table(score_answer_dir(args.answer_dir, args.pope_root)), end="")


if __name__ == "__main__":
    main()
