"""What POPE and MMBench share: asking a batched answer function every prompt, and writing summary files.

The model never appears here either: ``ask_all`` takes the same ``answer_fn`` as ``mme.evaluate_mme``
(``[(image, prompt), ...] -> [answer, ...]``), where an image is a path or an already decoded PIL image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

Request = tuple[Any, str]
"""(image path or PIL image, prompt text)."""
AnswerFn = Callable[[list[Request]], list[str]]


def ask_all(answer_fn: AnswerFn, items: Sequence, batch_size: int, desc: str, progress: bool = True,
            to_request: Callable[[Any], Request] | None = None) -> list[str]:
    """One answer per item, in order, asked in fixed batches so every run batches alike.

    Items are requests, or anything ``to_request`` turns into one when its batch comes (so that, say, images are
    decoded a batch at a time).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answers: list[str] = []
    with tqdm(total=len(items), desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = [to_request(item) if to_request else item for item in items[start : start + batch_size]]
            got = list(answer_fn(batch))
            if len(got) != len(batch) or not all(isinstance(a, str) for a in got):
                kinds = sorted({type(a).__name__ for a in got})
                raise ValueError(f"answer_fn must return {len(batch)} strings for a batch of {len(batch)}, "
                                 f"got {len(got)} items of types {kinds}")
            answers.extend(got)
            bar.update(len(batch))
    return answers


def write_summary(out_dir: str | Path, summary: Mapping, table: str) -> None:
    """summary.json for machines, summary.md (the Markdown table) for people."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(table, encoding="utf-8")
