"""`minigpt4qwen predict`: answer a JSONL file of questions about images, in batches, resumable.

    minigpt4qwen predict --checkpoint RUN_DIR --input questions.jsonl --out answers.jsonl --batch-size 16

Input rows: `{"id": ..., "image": PATH or [PATHS], "question": TEXT}`; image paths are relative to the input file's
folder or absolute. Each output row is the input row plus `"answer"`. The prompt is chat's (`ChatSession.turns_for`:
the image prompts, then the question) and the batch goes through `Assistant.generate`, the path eval uses (greedy
batches on CUDA through FastDecoder), so a greedy answer is the one `chat --query` gives for the same image and
question.

Output is appended and flushed (and fsynced) once per batch: a kill loses at most the batch in flight, and a rerun
with the same --out skips every id already there. A bad row (malformed JSON, a missing field, a missing or
undecodable image, a prompt over the text budget) is reported on stderr as `FILE: line N: reason` and the others are
still answered; the exit status is then 1.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..data.formats import BadSampleError, json_object
from ..data.images import load_image
from .generate import Assistant, GenerationSettings
from .session import ChatSession

__all__ = ["BadRowError", "Row", "add_predict_args", "answered_ids", "predict", "read_rows", "run_predict"]


class BadRowError(ValueError):
    """An input row that cannot be answered; the message says why and what to do."""


@dataclass
class Row:
    line: int
    data: dict
    images: list[Path]

    @property
    def key(self) -> str:
        return _key(self.data["id"])


def _key(value) -> str:
    """An id as compared across runs: its JSON text, so that 1 and "1" stay two ids."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _parse(text: str, root: Path) -> tuple[dict, list[Path]]:
    """One input line as (row, image paths); a BadRowError names what is wrong and what to do."""
    try:
        data = json_object(text)
    except ValueError as exc:
        raise BadRowError(f"{exc}; write one JSON object {{\"id\", \"image\", \"question\"}} per line") from None
    missing = [k for k in ("id", "image", "question") if k not in data]
    if missing:
        raise BadRowError(f"no {', '.join(repr(k) for k in missing)}; every row needs \"id\", \"image\", \"question\"")
    if isinstance(data["id"], bool) or not isinstance(data["id"], (str, int)):
        raise BadRowError(f"\"id\" is {json.dumps(data['id'])}; use a string or an integer")
    if not isinstance(data["question"], str) or not data["question"].strip():
        raise BadRowError("\"question\" must be a non-empty string")
    paths = data["image"] if isinstance(data["image"], list) else [data["image"]]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise BadRowError("\"image\" must be a path or a non-empty list of paths")
    images = [root / p for p in paths]  # an absolute p replaces root
    for path in images:
        if not path.is_file():
            raise BadRowError(f"image {path} not found; paths are relative to the input file's folder or absolute")
    return data, images


def read_rows(path: str | Path) -> tuple[list[Row], list[str]]:
    """The input file's usable rows and one `FILE: line N: reason` per bad row (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    rows: list[Row] = []
    bad: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                data, images = _parse(text, path.parent)
                first = seen.setdefault(_key(data["id"]), n)
                if first != n:
                    raise BadRowError(f"id {json.dumps(data['id'])} repeats line {first}; ids must be unique (a rerun "
                                     "skips the ids --out already holds)")
            except BadRowError as exc:
                bad.append(f"{path}: line {n}: {exc}")
                continue
            rows.append(Row(n, data, images))
    return rows, bad


def answered_ids(out: str | Path) -> set[str]:
    """Ids already in --out. A last line without its newline is a write a kill cut short: it is dropped (its row is
    answered again); any other line that is not a JSON row with an id stops the command."""
    out = Path(out)
    if not out.is_file():
        return set()
    raw = out.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(keep)
        print(f"{out}: dropped a partial last line (an interrupted write); its row is answered again", file=sys.stderr)
        raw = raw[:keep]
    ids = set()
    # "\n" only: rows are written with ensure_ascii=False, and splitlines() also splits at U+2028/U+2029/U+0085
    for n, text in enumerate(raw.decode("utf-8").split("\n"), 1):
        if not text.strip():
            continue
        try:
            ids.add(_key(json.loads(text)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BadSampleError(f"{out}: line {n} is not an output row with an \"id\"; pass a new --out or remove "
                                 "the line") from None
    return ids


def _answerable(assistant: Assistant, rows: list[Row], settings: GenerationSettings,
                report) -> tuple[list[Row], list, list]:
    """The rows of a batch whose images decode and whose prompt fits, with their turns and images."""
    keep, turns, images = [], [], []
    for row in rows:
        try:
            imgs = [load_image(p) for p in row.images]
            conv = ChatSession(assistant, [str(p) for p in row.images], settings).turns_for(row.data["question"])
            assistant.template.encode(conv, assistant.max_txt_len, add_generation_prompt=True)
        except ValueError as exc:  # ImageError, OverlongError, text the tokenizer cannot take: this row only
            report(f"line {row.line}: {exc}")
            continue
        keep.append(row)
        turns.append(conv)
        images.append(imgs)
    return keep, turns, images


def predict(assistant: Assistant, rows: list[Row], out: str | Path, batch_size: int = 16,
            settings: GenerationSettings | None = None, report=None, progress=None) -> int:
    """Answer `rows` into `out` (appended, one flushed write per batch); returns how many rows were bad."""
    settings = settings or GenerationSettings(max_new_tokens=256)
    bad = 0

    def failed(message: str) -> None:
        nonlocal bad
        bad += 1
        if report is not None:
            report(message)

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(rows), batch_size):
            batch, turns, images = _answerable(assistant, rows[start:start + batch_size], settings, failed)
            answers = assistant.generate(turns, images, settings) if batch else []
            f.write("".join(json.dumps({**row.data, "answer": answer}, ensure_ascii=False) + "\n"
                            for row, answer in zip(batch, answers)))
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress(len(rows[start:start + batch_size]))
    return bad


def run_predict(args) -> int:
    from tqdm import tqdm

    from .cli import settings_from_args

    src, out = Path(args.input), Path(args.out)
    if out.exists() and out.resolve() == src.resolve():
        raise FileExistsError(f"--out {out} is the input file; pick another --out")
    rows, bad = read_rows(src)
    done = answered_ids(out)  # an --out that is no output file stops the command before rows are reported
    for line in bad:
        print(line, file=sys.stderr)
    todo = [r for r in rows if r.key not in done]
    if len(rows) > len(todo):
        print(f"{out}: {len(rows) - len(todo)} row(s) already answered, {len(todo)} to go", file=sys.stderr)
    failed = 0
    if todo:
        assistant = Assistant.from_args(args)
        with tqdm(total=len(todo), desc="predict", unit="row", file=sys.stderr) as bar:
            failed = predict(assistant, todo, out, args.batch_size, settings_from_args(args),
                             report=lambda msg: bar.write(f"{src}: {msg}", file=sys.stderr), progress=bar.update)
    print(f"{out}: {len(todo) - failed} answered, {len(bad) + failed} bad row(s)", file=sys.stderr)
    return 1 if bad or failed else 0


def _positive(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def add_predict_args(p) -> None:
    from .args import add_compile_decode_arg, add_quantize_arg
    from .cli import add_generation_args

    p.add_argument("--checkpoint", required=True, help="run directory (or one of its checkpoint directories)")
    p.add_argument("--input", required=True, help='JSONL rows {"id", "image": PATH or [PATHS], "question"}')
    p.add_argument("--out", required=True, help="output JSONL (input rows + \"answer\"); an existing one is resumed")
    p.add_argument("--batch-size", type=_positive, default=16, help="questions answered together")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_compile_decode_arg(p)
    add_quantize_arg(p)
    add_generation_args(p)
