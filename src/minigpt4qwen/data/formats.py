"""Annotation formats -> one `Sample` type.

Seed (MiniGPT4Qwen) JSON: a list of {"image": "rel/path.jpg", "instruction": "<Img><ImageHere></Img> q" | [q1, q2],
"output": "a" | [a1, a2]}. LLaVA JSON: a list of {"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}. "image" may also be a list (several images) or absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .conversation import IMAGE_MARKER, IMAGE_PROMPT, Turn


class BadSampleError(ValueError):
    """A row or image that cannot be used; the message names the file, the row and the fix."""


@dataclass
class Sample:
    turns: list[Turn]
    images: list[Path]
    source: str
    """`file:row` for error messages."""


def _as_list(value, what: str, where: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadSampleError(f"{where}: '{what}' must be a string or a list of strings, got {type(value).__name__}")


def _images(row: dict, root: Path, where: str) -> list[Path]:
    if "image" not in row or row["image"] in (None, ""):
        return []
    return [root / p for p in _as_list(row["image"], "image", where)]


def _with_image_markers(turns: list[Turn], n_images: int, where: str) -> list[Turn]:
    """Put the image prompt in front of the first user turn when the text names no image (a common omission)."""
    n_markers = sum(t.content.count(IMAGE_MARKER) for t in turns)
    if n_markers == 0 and n_images:
        first = turns[0]
        turns[0] = Turn(first.role, "\n".join([IMAGE_PROMPT] * n_images) + " " + first.content)
        n_markers = n_images
    if n_markers != n_images:
        raise BadSampleError(f"{where}: {n_markers} image markers in the text but {n_images} image files listed")
    return turns


def parse_seed_row(row: dict, root: Path, where: str) -> Sample:
    for key in ("instruction", "output"):
        if key not in row:
            raise BadSampleError(f"{where}: missing key '{key}' (seed rows need image, instruction, output)")
    questions = _as_list(row["instruction"], "instruction", where)
    answers = _as_list(row["output"], "output", where)
    if len(questions) != len(answers):
        raise BadSampleError(f"{where}: {len(questions)} instructions but {len(answers)} outputs; they must pair up")
    turns = [t for q, a in zip(questions, answers) for t in (Turn("user", q), Turn("assistant", a))]
    images = _images(row, root, where)
    return Sample(_with_image_markers(turns, len(images), where), images, where)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def parse_llava_row(row: dict, root: Path, where: str) -> Sample:
    convs = row.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise BadSampleError(f"{where}: 'conversations' must be a non-empty list of {{from, value}}")
    turns = []
    for k, msg in enumerate(convs):
        if not isinstance(msg, dict) or msg.get("from") not in _ROLES or not isinstance(msg.get("value"), str):
            raise BadSampleError(f"{where}: conversations[{k}] needs 'from' (human|gpt) and a string 'value'")
        role = _ROLES[msg["from"]]
        if turns and turns[-1].role == role:
            raise BadSampleError(f"{where}: conversations[{k}] repeats role {msg['from']!r}; turns must alternate")
        turns.append(Turn(role, msg["value"].replace("<image>", IMAGE_PROMPT).strip()))
    if turns[0].role != "user" or turns[-1].role != "assistant":
        raise BadSampleError(f"{where}: a conversation must start with human and end with gpt")
    images = _images(row, root, where)
    return Sample(_with_image_markers(turns, len(images), where), images, where)


def detect_format(row: dict) -> str:
    return "llava" if "conversations" in row else "seed"


def load_annotations(path: str | Path, image_root: str | Path = "", fmt: str = "auto", on_bad: str = "error"):
    """Read one annotation file; returns (samples, skipped) where skipped lists the error lines of skipped rows."""
    path = Path(path)
    if not path.is_file():
        raise BadSampleError(f"annotation file {path} not found; check data.train[*].path")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadSampleError(f"{path}: not valid JSON ({exc}); fix the file") from None
    if isinstance(rows, dict) and "annotations" in rows:
        rows = rows["annotations"]
    if not isinstance(rows, list):
        raise BadSampleError(f"{path}: expected a JSON list of samples")
    root = Path(image_root) if image_root else path.parent
    samples, skipped = [], []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        try:
            if not isinstance(row, dict):
                raise BadSampleError(f"{where}: expected an object, got {type(row).__name__}")
            kind = detect_format(row) if fmt == "auto" else fmt
            samples.append(parse_llava_row(row, root, where) if kind == "llava" else parse_seed_row(row, root, where))
        except BadSampleError as exc:
            if on_bad != "skip":
                raise BadSampleError(f"{exc} (or set data.on_bad_sample=skip)") from None
            skipped.append(str(exc))
    return samples, skipped


def json_object(line: str) -> dict:
    """One JSON-lines row as a dict; a ValueError says what is wrong with it (for the caller to prefix with where)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row
