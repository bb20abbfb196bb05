"""What MME, POPE and MMBench share: asking a batched answer function every prompt, one-line input errors, and
writing summary files.

The model never appears here: ``ask_all`` takes an ``answer_fn`` (``[(image, prompt), ...] -> [answer, ...]``),
where an image is a path or an already decoded PIL image.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data.formats import BadSampleError
from ..data.images import ImageError

Request = tuple[Any, str]
"""(image path or PIL image, prompt text)."""
AnswerFn = Callable[[list[Request]], list[str]]


class EvalOptionError(ValueError):
    """An eval option that cannot work (``--batch-size 0``, no benchmark chosen); the message names the option."""


INPUT_ERRORS = (BadSampleError, ImageError, EvalOptionError, FileNotFoundError)
"""What bad benchmark files or options raise: reported as one ``error:`` line, never as a traceback."""


def at_least_one(**options: int) -> None:
    """Checked before any model is loaded, so a typo costs nothing."""
    for name, value in options.items():
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise EvalOptionError(f"{flag} must be >= 1, got {value}")


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """For the ``python -m minigpt4qwen.eval.*`` rescoring commands: a bad file prints one line, exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except INPUT_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped


def ask_all(answer_fn: AnswerFn, items: Sequence, batch_size: int, desc: str, progress: bool = True,
            to_request: Callable[[Any], Request] | None = None, workers: int = 4) -> list[str]:
    """One answer per item, in order, asked in fixed batches so every run batches alike.

    Items are requests, or anything ``to_request`` turns into one when its batch comes (so that, say, images are
    decoded a batch at a time). An ``answer_fn`` with a ``load(image) -> PIL image or input tensor`` method gets its
    images through it. The next batch is prepared in ``workers`` threads while the current one is answered: decoding and resizing
    in Pillow (and torch's tensor ops) release the GIL, and on a GPU they would otherwise take longer than the
    answers.
    """
    if batch_size < 1:
        raise EvalOptionError(f"batch_size must be >= 1, got {batch_size}")
    load = getattr(answer_fn, "load", None)

    def prepare(item: Any) -> Request:
        image, prompt = to_request(item) if to_request else item
        return (load(image) if load else image), prompt

    answers: list[str] = []
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(items), desc=desc, unit="q", disable=not progress) as bar:

        def submit(start: int) -> list[Future]:
            return [pool.submit(prepare, item) for item in items[start : start + batch_size]]

        pending = submit(0)
        for start in range(0, len(items), batch_size):
            batch = [future.result() for future in pending]
            pending = submit(start + batch_size)
            got = list(answer_fn(batch))
            if len(got) != len(batch) or not all(isinstance(a, str) for a in got):
                kinds = sorted({type(a).__name__ for a in got})
                raise ValueError(f"answer_fn must return {len(batch)} strings for a batch of {len(batch)}, "
                                 f"got {len(got)} items of types {kinds}")
            answers.extend(got)
            bar.update(len(batch))
    return answers


def write_summary(out_dir: str | Path, summary: Mapping, table: str,
                  plot: Callable[[Mapping, Path], None] | None = None) -> None:
    """summary.json for machines, summary.md (the Markdown table) for people, scores.png by ``plot`` for a glance."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(table, encoding="utf-8")
    if plot is not None:
        plot(summary, out_dir / "scores.png")
