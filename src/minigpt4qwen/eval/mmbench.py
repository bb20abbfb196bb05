"""MMBench multiple choice from its official TSV, with circular evaluation and LLaVA's prompt.

    minigpt4qwen eval mmbench --checkpoint RUN_DIR --tsv mmbench_dev_20230712.tsv [--out DIR] [--no-circular]

The TSV columns are ``index, question, hint, A, B, C, D, answer, category, l2-category, image`` (base64) and more;
options after the first empty one are dropped, as LLaVA's ``model_vqa_mmbench.py`` does. Circular evaluation asks
each question once per rotation of its options (the letters stay A, B, ...; the texts move) and counts it only if
every rotation is answered right. Answers are read by option letter (VLMEvalKit's rule), then by an exact match on
an option's text. The test split has no ``answer`` column: then only the submission file is written.

Outputs: ``answers.jsonl`` (LLaVA's answer format, one line per question and rotation), ``submission.xlsx`` (MMBench's
submission columns, the file to upload) and the same table as ``submission.tsv``, ``summary.json`` and ``summary.md``.
Rescore with ``python -m minigpt4qwen.eval.mmbench answers.jsonl --tsv FILE.tsv``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..data.formats import BadSampleError
from .pope import _json_lines
from .report import AnswerFn, ask_all, one_line_errors, write_summary

LETTERS = ("A", "B", "C", "D")
ANSWER_HINT = "Answer with the option's letter from the given choices directly."
REQUIRED = ("index", "question", "A", "B", "image")
# MMBench's own conversion to a submission drops these columns and puts the prediction after the options.
_NOT_SUBMITTED = {"hint", "category", "source", "image", "comment", "l2-category"}
_PREDICTION_COLUMN = 6
_PUNCTUATION = ".()[],:;!*#{}"


@dataclass(frozen=True)
class Question:
    """One MMBench row: options as released (empty ones cut), the answer letter (None in the test split)."""

    index: str
    question: str
    hint: str | None
    options: tuple[str, ...]
    answer: str | None
    category: str
    l2_category: str
    image: bytes
    row: dict
    where: str

    @property
    def question_id(self) -> int | str:
        """The index as LLaVA and MMBench's tools compare it (an int when it is one)."""
        return int(self.index) if self.index.isdigit() else self.index

    def pil_image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.image)).convert("RGB")


def _is_none(value: str | None) -> bool:
    """Empty cells arrive as '' here and as NaN through pandas; LLaVA also treats 'nan' and 'none' as empty."""
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


def _image_bytes(value: str, where: str) -> bytes:
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadSampleError(f"{where}: column 'image' is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadSampleError(f"{where}: column 'image' decodes to no readable image ({exc})") from None
    return data


def read_mmbench(path: str | Path) -> list[Question]:
    """All rows in file order; a malformed row raises one line naming the file, its line and the problem.

    An ``image`` cell that holds another row's index (circular TSVs store each image once) reuses that image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMBench TSV {path} not found")
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's 128 KiB default
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise BadSampleError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        width = len(reader.fieldnames)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                got = width + len(row.get(None, [])) - sum(v is None for v in row.values())
                raise BadSampleError(f"{where}: {got} tab-separated fields, the header has {width}")
            rows.append((where, row))
    if not rows:
        raise BadSampleError(f"{path}: no rows")
    by_index = {row["index"]: row["image"] for _, row in rows}
    questions, seen = [], set()
    for where, row in rows:
        where = f"{where} (index {row['index']})"
        if row["index"] in seen:
            raise BadSampleError(f"{where}: the index repeats an earlier row's")
        seen.add(row["index"])
        image = row.pop("image")  # kept decoded in the Question only (the submission leaves images out)
        if len(image) < 64 and image.strip() in by_index and image.strip() != row["index"]:
            image = by_index[image.strip()]
        options = []
        for letter in LETTERS:
            if _is_none(row.get(letter)):
                break
            options.append(row[letter])
        if len(options) < 2:
            raise BadSampleError(f"{where}: needs at least options A and B, got {len(options)}")
        answer = row.get("answer")
        answer = None if _is_none(answer) else answer.strip()
        if answer is not None and answer not in LETTERS[: len(options)]:
            raise BadSampleError(f"{where}: answer {answer!r} is not one of the options "
                                 f"{', '.join(LETTERS[: len(options)])}")
        hint = None if _is_none(row.get("hint")) else row["hint"]
        category = row.get("category") or "unknown"
        questions.append(Question(row["index"], row["question"], hint, tuple(options), answer, category,
                                  row.get("l2-category") or "unknown", _image_bytes(image, where), row, where))
    return questions


# ---------------------------------------------------------------------------------------------------------------------
# Prompts, rotations and answer extraction


def build_prompt(question: str, hint: str | None, options: Sequence[str]) -> str:
    """LLaVA's MMBench prompt: hint, question, one 'A. text' line per option, then the single-letter instruction."""
    text = f"{hint}\n{question}" if hint else question
    for letter, option in zip(LETTERS, options):
        text += f"\n{letter}. {option}"
    return f"{text}\n{ANSWER_HINT}"


def rotations(question: Question, circular: bool = True) -> list[tuple[tuple[str, ...], str | None]]:
    """(options in asked order, right letter) per round; round r moves option r to A, as LLaVA's --all-rounds."""
    n = len(question.options)
    truth = LETTERS.index(question.answer) if question.answer else None
    out = []
    for r in range(n if circular else 1):
        options = question.options[r:] + question.options[:r]
        out.append((options, None if truth is None else LETTERS[(truth - r) % n]))
    return out


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The letter chosen: exactly one option letter as a word (VLMEvalKit's ``can_infer_option``, whose guard
    against the article 'A' in longer answers is kept), else an answer equal to exactly one option's text."""
    letters = LETTERS[: len(options)]
    words = text
    for char in _PUNCTUATION:
        words = words.replace(char, " ")
    words = words.split()
    hits = [letter for letter in letters if letter in words]
    if len(hits) == 1 and not ("A" in words and len(words) > 3):
        return hits[0]
    norm = text.strip().rstrip(".").strip().lower()
    same = [letter for letter, option in zip(letters, options) if option.strip().rstrip(".").strip().lower() == norm]
    return same[0] if len(same) == 1 else None


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def score(questions: Sequence[Question], answers: Mapping[str, Sequence[str]], circular: bool = True) -> dict:
    """Accuracy in percent, overall and per category / l2-category, over the questions that have ground truth.

    ``answers`` maps a question's index to its answers, one per rotation in ``rotations`` order. A question counts
    as right only if every rotation is; ``first_round`` is the plain (non-circular) accuracy of rotation 0.
    """
    right: dict[str, bool] = {}
    first = unparsed = 0
    for q in questions:
        if q.answer is None:
            continue
        rounds = rotations(q, circular)
        texts = answers.get(q.index)
        if texts is None or len(texts) != len(rounds):
            raise BadSampleError(f"{q.where}: need {len(rounds)} answer(s) (one per rotation of its options), got "
                                 f"{0 if texts is None else len(texts)}; were the answers made with --no-circular?")
        picks = [extract_choice(text, options) for text, (options, _) in zip(texts, rounds)]
        unparsed += picks.count(None)
        right[q.index] = all(p == truth for p, (_, truth) in zip(picks, rounds))
        first += picks[0] == rounds[0][1]
    scored = [q for q in questions if q.index in right]

    def accuracy(group: Sequence[Question]) -> dict:
        return {"accuracy": 100.0 * sum(right[q.index] for q in group) / len(group), "n": len(group)}

    def by(key: str) -> dict:
        groups: dict[str, list[Question]] = {}
        for q in scored:
            groups.setdefault(getattr(q, key), []).append(q)
        return {name: accuracy(groups[name]) for name in sorted(groups)}

    return {
        "circular": circular,
        "overall": accuracy(scored)["accuracy"] if scored else None,
        "first_round": 100.0 * first / len(scored) if scored else None,
        "scored": len(scored),
        "unscored": len(questions) - len(scored),
        "unparsed_answers": unparsed,
        "categories": by("category"),
        "l2_categories": by("l2_category"),
    }


def format_table(summary: Mapping) -> str:
    """Markdown: overall, then one row per category (l2-categories below)."""
    if summary["overall"] is None:
        return f"No ground truth in this TSV (test split): {summary['unscored']} questions, submission file only.\n"
    kind = "circular" if summary["circular"] else "single pass"
    head = (f"MMBench accuracy ({kind}): **{summary['overall']:.2f}** over {summary['scored']} questions "
            f"(rotation 0 alone: {summary['first_round']:.2f}; answers without a letter: "
            f"{summary['unparsed_answers']})")
    lines = [head, ""]
    for title, key in (("Category", "categories"), ("L2-category", "l2_categories")):
        lines += [f"| {title} | Accuracy | N |", "|---|---:|---:|"]
        lines += [f"| {name} | {s['accuracy']:.2f} | {s['n']} |" for name, s in summary[key].items()]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Answer files


def write_answers(out_dir: str | Path, questions: Sequence[Question], answers: Mapping[str, Sequence[str]],
                  circular: bool = True) -> None:
    """answers.jsonl (LLaVA's fields, one line per rotation) and submission.xlsx + .tsv (MMBench's submission
    columns)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for q in questions:
        for r, ((options, _), text) in enumerate(zip(rotations(q, circular), answers[q.index], strict=True)):
            letters = list(LETTERS[: len(options)])
            lines.append(json.dumps({
                "question_id": q.question_id, "round_id": r, "prompt": build_prompt(q.question, q.hint, options),
                "text": text, "options": list(options), "option_char": letters[r:] + letters[:r],
                "prediction": extract_choice(text, options),
            }, ensure_ascii=False) + "\n")
    (out_dir / "answers.jsonl").write_text("".join(lines), encoding="utf-8")
    columns = [c for c in questions[0].row if c not in _NOT_SUBMITTED]
    columns.insert(min(_PREDICTION_COLUMN, len(columns)), "prediction")
    # Rotation 0 keeps the released letters, so its answer is the one MMBench's server can check.
    rows = [[answers[q.index][0] if c == "prediction" else q.row[c] for c in columns] for q in questions]
    with (out_dir / "submission.tsv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        writer.writerows(rows)
    from openpyxl import Workbook  # the .xlsx the OpenCompass server takes; the TSV is for reading and diffing
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    book = Workbook(write_only=True)
    sheet = book.create_sheet()
    sheet.append(columns)
    for row in rows:  # control characters (a model may answer with any token) cannot be stored in a worksheet
        sheet.append([ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v for v in row])
    book.save(out_dir / "submission.xlsx")


def read_answers(path: str | Path, questions: Sequence[Question]) -> dict[str, list[str]]:
    """Answers per question index from an answers.jsonl, ordered by round_id."""
    by_round: dict[str, dict[int, str]] = {}
    for where, row in _json_lines(Path(path)):
        for key in ("question_id", "round_id", "text"):
            if key not in row:
                raise BadSampleError(f"{where}: missing field '{key}'")
        if not isinstance(row["round_id"], int) or isinstance(row["round_id"], bool) or row["round_id"] < 0:
            raise BadSampleError(f"{where}: round_id must be an integer >= 0, got {row['round_id']!r}")
        by_round.setdefault(str(row["question_id"]), {})[row["round_id"]] = str(row["text"])
    return {q.index: [rounds[r] for r in sorted(rounds)] for q in questions if (rounds := by_round.get(q.index))}


# ---------------------------------------------------------------------------------------------------------------------
# Running a model


def evaluate_mmbench(answer_fn: AnswerFn, questions: Sequence[Question], out_dir: str | Path, batch_size: int = 16,
                     circular: bool = True, progress: bool = True) -> dict:
    """Ask ``read_mmbench``'s questions (every rotation when circular), write answer and submission files, return
    the scores. ``answer_fn`` gets ``[(PIL image, prompt), ...]``.
    """
    asked = [(q, options) for q in questions for options, _ in rotations(q, circular)]

    def request(item: tuple[Question, tuple[str, ...]]) -> tuple[Image.Image, str]:
        q, options = item  # decoded when its batch comes, never the whole benchmark at once
        return q.pil_image(), build_prompt(q.question, q.hint, options)

    texts = ask_all(answer_fn, asked, batch_size, "MMBench", progress, to_request=request)
    answers: dict[str, list[str]] = {}
    for (q, _), text in zip(asked, texts, strict=True):
        answers.setdefault(q.index, []).append(text)
    summary = score(questions, answers, circular)
    write_answers(out_dir, questions, answers, circular)
    write_summary(out_dir, summary, format_table(summary))
    return summary


def score_answer_file(answers: str | Path, tsv: str | Path, circular: bool = True) -> dict:
    """Rescore an answers.jsonl (ours, or LLaVA's with --all-rounds) against the TSV it answers."""
    questions = read_mmbench(tsv)
    return score(questions, read_answers(answers, questions), circular)


@one_line_errors
def main(argv: Sequence[str] | None = None) -> None:
    """Rescore an answers.jsonl against its TSV and print the table."""
    parser = argparse.ArgumentParser(prog="python -m minigpt4qwen.eval.mmbench", description=main.__doc__)
    parser.add_argument("answers", type=Path, help="answers.jsonl written by `minigpt4qwen eval mmbench`")
    parser.add_argument("--tsv", required=True, type=Path, help="the MMBench TSV the answers are for")
    parser.add_argument("--no-circular", dest="circular", action="store_false", help="the answers are single pass")
    args = parser.parse_args(argv)
    print(format_table(score_answer_file(args.answers, args.tsv, args.circular)), end="")


if __name__ == "__main__":
    main()
