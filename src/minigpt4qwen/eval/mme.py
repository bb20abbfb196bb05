"""MME benchmark (perception 10 subtasks, max 2000; cognition 4 subtasks, max 800), scored like MME's own tool.

The model never appears here: ``evaluate_mme`` takes a batched ``answer_fn`` so the same code scores any checkpoint,
an API model or a fake in the tests. Answer files are written in MME's result format so MME's ``calculation.py``
can rescore them and ``score_answer_dir`` can rescore results written by others.

Run through the package CLI (``minigpt4qwen eval ...``), or rescore an existing answer folder with
``python -m minigpt4qwen.eval.mme runs/mme`` (prints the Markdown table).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.formats import BadSampleError
from . import report
from .report import AnswerFn, ask_all, one_line_errors

log = logging.getLogger(__name__)

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
SUBTASKS = PERCEPTION + COGNITION
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
DEFAULT_SUFFIX = "Answer the question using a single word or phrase."
# MME asks exactly two questions per image; acc_plus is defined on that pair.
QUESTIONS_PER_IMAGE = 2


@dataclass(frozen=True)
class Item:
    """One MME question: an image, the question text exactly as released, and the yes/no ground truth."""

    subtask: str
    image: Path
    question: str
    truth: str

    @property
    def image_name(self) -> str:
        """File name as MME's result files spell the image."""
        return self.image.name


@dataclass(frozen=True)
class AnswerRow:
    """One line of an MME result file: ``image<TAB>question<TAB>ground_truth<TAB>prediction``."""

    image: str
    question: str
    truth: str
    prediction: str

    def to_line(self) -> str:
        """Tabs and newlines inside a field would split the line for MME's tool, so they become spaces."""
        return "\t".join(_flatten(field) for field in (self.image, self.question, self.truth, self.prediction)) + "\n"


def _flatten(text: str) -> str:
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " ")


def _truth(value: str, where: str) -> str:
    """MME's ground truths are yes/no in varying capitalisation; anything else means a broken file."""
    label = value.strip().lower()
    if label not in ("yes", "no"):
        raise BadSampleError(f"{where}: ground truth must be yes or no, got {value!r}; fix or replace the file")
    return label


def _content_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, line without CR/LF) for non-blank lines; utf-8-sig tolerates a BOM."""
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            yield number, line


# ---------------------------------------------------------------------------------------------------------------------
# Reading the benchmark


def missing_subtasks(found: Iterable[str]) -> list[str]:
    """Subtasks absent from ``found``, in MME's order, so partial runs are never mistaken for full scores."""
    present = set(found)
    return [name for name in SUBTASKS if name not in present]


def _image_index(folder: Path) -> dict[str, list[Path]]:
    """Images by stem, listed once per folder; extensions vary (.jpg/.png/.jpeg) even inside one subtask."""
    index: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            index.setdefault(path.stem, []).append(path)
    return index


def _find_image(index: dict[str, list[Path]], question_file: Path, folder: Path) -> Path:
    matches = index.get(question_file.stem, [])
    if len(matches) != 1:
        what = "no image" if not matches else f"several images ({', '.join(p.name for p in matches)})"
        raise FileNotFoundError(f"{question_file}: {what} named {question_file.stem}.* in {folder}")
    return matches[0]


def _read_question_file(subtask: str, path: Path, image: Path) -> list[Item]:
    items = []
    for number, line in _content_lines(path):
        # The answer is the last field; splitting from the right keeps any tab inside a question intact.
        parts = line.rstrip().rsplit("\t", 1)
        if len(parts) != 2:
            raise BadSampleError(f"{path}:{number}: expected 'question<TAB>yes|no', got {line!r}")
        items.append(Item(subtask, image, parts[0], _truth(parts[1], f"{path}:{number}")))
    if len(items) != QUESTIONS_PER_IMAGE:
        raise BadSampleError(f"{path}: expected {QUESTIONS_PER_IMAGE} questions (one per line), found {len(items)}")
    return items


def _read_subtask(folder: Path) -> list[Item]:
    """Two released layouts: ``images/`` + ``questions_answers_YN/``, or images beside their .txt files."""
    split_questions = folder / "questions_answers_YN"
    question_dir, image_dir = (split_questions, folder / "images") if split_questions.is_dir() else (folder, folder)
    index = _image_index(image_dir)
    items = []
    for question_file in sorted(question_dir.glob("*.txt"), key=lambda p: p.name):
        image = _find_image(index, question_file, image_dir)
        items.extend(_read_question_file(folder.name, question_file, image))
    return items


def read_mme(root: str | Path) -> dict[str, list[Item]]:
    """All questions per subtask in MME's order, sorted by file name then line order so every run batches alike.

    Subtasks that are absent or empty are left out of the result and logged; ``missing_subtasks`` names them and
    ``summarize`` reports them. Folders that are not MME subtasks are ignored with a note.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME root {root} is not a folder")
    for extra in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in SUBTASKS):
        log.info("MME: ignoring folder %s (not an MME subtask)", root / extra)
    data = {}
    for name in SUBTASKS:
        folder = root / name
        items = _read_subtask(folder) if folder.is_dir() else []
        if items:
            data[name] = items
    if not data:
        raise FileNotFoundError(f"no MME subtask found under {root}; expected folders such as existence/, OCR/")
    missing = missing_subtasks(data)
    if missing:
        log.warning("MME: %d subtask(s) missing or empty under %s: %s", len(missing), root, ", ".join(missing))
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def parse_prediction(text: str) -> str:
    """MME's rule: exact yes/no, else look for yes (then no) in the first 4 characters, else "other"."""
    answer = text.strip().lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def score_subtask(rows: Sequence[AnswerRow]) -> dict[str, float | int]:
    """acc and acc_plus are percentages so that score = acc + acc_plus (max 200), as in MME's tables.

    Like MME's tool, consecutive lines form an image's pair; the pair must name one image, else acc_plus would
    silently pair questions of different images.
    """
    if not rows or len(rows) % QUESTIONS_PER_IMAGE:
        raise ValueError(f"need {QUESTIONS_PER_IMAGE} answer rows per image, got {len(rows)} rows")
    correct = both_right = other = 0
    for start in range(0, len(rows), QUESTIONS_PER_IMAGE):
        pair = rows[start : start + QUESTIONS_PER_IMAGE]
        if len({row.image for row in pair}) != 1:
            raise ValueError(f"rows {start + 1}-{start + len(pair)} mix images: {[row.image for row in pair]}")
        labels = [parse_prediction(row.prediction) for row in pair]
        hits = sum(label == row.truth for label, row in zip(labels, pair, strict=True))
        correct += hits
        both_right += hits == len(pair)
        other += labels.count("other")
    acc = 100.0 * correct / len(rows)
    acc_plus = 100.0 * both_right / (len(rows) // QUESTIONS_PER_IMAGE)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "other": other}


def summarize(results: Mapping[str, Sequence[AnswerRow]]) -> dict:
    """Perception and cognition totals over the subtasks present; absent ones are listed, never scored as 0."""
    unknown = sorted(set(results) - set(SUBTASKS))
    if unknown:
        raise ValueError(f"unknown MME subtask(s): {', '.join(unknown)}")
    subtasks = {}
    for name in (name for name in SUBTASKS if name in results):
        try:
            subtasks[name] = score_subtask(results[name])
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    return {
        "perception": sum(subtasks[name]["score"] for name in PERCEPTION if name in subtasks),
        "cognition": sum(subtasks[name]["score"] for name in COGNITION if name in subtasks),
        "subtasks": subtasks,
        "missing": missing_subtasks(results),
    }


def spread(summaries: Sequence[Mapping]) -> dict:
    """Mean/min/max/std over reruns, since one MME run moves by about +-20 and a single number overstates a gain.

    std is the sample standard deviation (0.0 for a single run).
    """
    if not summaries:
        raise ValueError("spread needs at least one summary")
    out: dict = {"runs": len(summaries)}
    for key in ("perception", "cognition"):
        values = [float(s[key]) for s in summaries]
        out[key] = {
            "mean": statistics.fmean(values),
            "min": min(values),
            "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Answer files and reports


def write_answers(out_dir: str | Path, results: Mapping[str, Sequence[AnswerRow]]) -> None:
    """One ``<subtask>.txt`` per subtask in MME's result format, rows in the order given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in results.items():
        (out_dir / f"{name}.txt").write_text("".join(row.to_line() for row in rows), encoding="utf-8")


def read_answers(path: str | Path) -> list[AnswerRow]:
    """Parse one MME result file; a malformed line names the file and line instead of failing later in scoring."""
    path = Path(path)
    rows = []
    for number, line in _content_lines(path):
        fields = line.split("\t")
        if len(fields) != 4:
            raise BadSampleError(f"{path}:{number}: expected 4 tab-separated fields, got {len(fields)}: {line!r}")
        image, question, truth, prediction = fields
        rows.append(AnswerRow(image, question, _truth(truth, f"{path}:{number}"), prediction))
    return rows


def score_answer_dir(answer_dir: str | Path) -> dict:
    """Rescore ``<subtask>.txt`` result files (ours or anyone's in MME's format), like MME's calculation tool."""
    answer_dir = Path(answer_dir)
    results = {}
    for name in SUBTASKS:
        path = answer_dir / f"{name}.txt"
        if path.is_file():
            results[name] = read_answers(path)
    for extra in sorted(p.name for p in answer_dir.glob("*.txt") if p.stem not in SUBTASKS):
        log.info("MME: ignoring %s (not an MME subtask)", answer_dir / extra)
    if not results:
        raise FileNotFoundError(f"no MME answer file (<subtask>.txt) in {answer_dir}")
    try:
        return summarize(results)
    except ValueError as err:  # rows that do not pair up: the files are broken, not the code
        raise BadSampleError(f"{answer_dir}: {err}") from None


def format_table(summary: Mapping) -> str:
    """Markdown table of subtask scores and both totals, with missing subtasks named under it."""
    lines = ["| Subtask | Acc | Acc+ | Score | Other |", "|---|---:|---:|---:|---:|"]
    for name, s in summary["subtasks"].items():
        lines.append(f"| {name} | {s['acc']:.2f} | {s['acc_plus']:.2f} | {s['score']:.2f} | {s['other']} |")
    lines.append(f"| **Perception** (max {200 * len(PERCEPTION)}) | | | **{summary['perception']:.2f}** | |")
    lines.append(f"| **Cognition** (max {200 * len(COGNITION)}) | | | **{summary['cognition']:.2f}** | |")
    if summary["missing"]:
        lines += ["", f"Missing subtasks (not scored): {', '.join(summary['missing'])}"]
    return "\n".join(lines) + "\n"


def plot_scores(summary: Mapping, path: str | Path) -> None:
    """Bar chart of subtask scores; the Agg canvas is used directly so no GUI or global backend state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summary["subtasks"])
    scores = [summary["subtasks"][name]["score"] for name in names]
    colors = ["tab:blue" if name in PERCEPTION else "tab:orange" for name in names]
    fig = Figure(figsize=(8, 0.4 * len(names) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(names, scores, color=colors)
    ax.invert_yaxis()
    ax.set_xlim(0, 200)
    ax.set_xlabel("score (acc + acc+, max 200)")
    ax.set_title(f"MME perception {summary['perception']:.1f} (blue), cognition {summary['cognition']:.1f} (orange)")
    for y, score in enumerate(scores):
        ax.text(score + 2, y, f"{score:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_summary(out_dir: str | Path, summary: Mapping) -> None:
    """summary.json for machines, summary.md for people, scores.png for a glance."""
    report.write_summary(out_dir, summary, format_table(summary), plot_scores)


# ---------------------------------------------------------------------------------------------------------------------
# Running a model


def build_prompt(question: str, suffix: str | None = DEFAULT_SUFFIX) -> str:
    """The released question is kept verbatim (its own "Please answer yes or no." included); the suffix follows."""
    return f"{question} {suffix}" if suffix else question


def evaluate_mme(
    answer_fn: AnswerFn,
    mme_root: str | Path | Mapping[str, Sequence[Item]],
    out_dir: str | Path,
    batch_size: int = 16,
    prompt_suffix: str | None = DEFAULT_SUFFIX,
    progress: bool = True,
) -> dict:
    """Ask ``answer_fn`` every MME question in fixed batches, write answer files and reports, return the summary.

    ``mme_root`` is the benchmark folder or what ``read_mme`` read from it (callers read first so that a broken file
    fails before a model is loaded). ``answer_fn`` gets ``[(image_path, prompt), ...]`` and returns one string per
    pair; batching crosses subtask borders so the last batch of a subtask is not left half empty.
    """
    data = read_mme(mme_root) if isinstance(mme_root, (str, Path)) else mme_root
    items = [item for name in data for item in data[name]]
    predictions = ask_all(answer_fn, [(item.image, build_prompt(item.question, prompt_suffix)) for item in items],
                          batch_size, "MME", progress)
    results: dict[str, list[AnswerRow]] = {name: [] for name in data}
    for item, prediction in zip(items, predictions, strict=True):
        results[item.subtask].append(AnswerRow(item.image_name, item.question, item.truth, prediction))
    summary = summarize(results)
    write_answers(out_dir, results)
    write_summary(out_dir, summary)
    return summary


@one_line_errors
def main(argv: Sequence[str] | None = None) -> None:
    """Rescore an answer folder and print the table, for results produced elsewhere or by an older run."""
    parser = argparse.ArgumentParser(prog="python -m minigpt4qwen.eval.mme", description=main.__doc__)
    parser.add_argument("answer_dir", type=Path, help="folder holding <subtask>.txt files in MME's result format")
    args = parser.parse_args(argv)
    print(format_table(score_answer_dir(args.answer_dir)), end="")


if __name__ == "__main__":
    main()
