"""MME + POPE + MMBench in one run, one report with published anchors beside our numbers.

    minigpt4qwen eval all --checkpoint RUN_DIR --mme-root MME --pope-root POPE --images COCO/val2014 --tsv FILE.tsv

Like the single benchmarks, nothing here knows the model: ``evaluate_suite`` takes ``answer_fn_for(benchmark)``,
which returns the batched answer function to use for that benchmark (its answer length may differ). Every file is
read and checked by ``read_suite`` before any question is asked. The output folder holds one folder per benchmark
(its answer files in the official formats and its own summary) and the combined ``summary.json``, ``summary.md``
(a table with the anchors) and ``scores.png`` (a bar chart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import mmbench, mme, pope
from .mme import DEFAULT_SUFFIX
from .report import AnswerFn, EvalOptionError, write_summary

BENCHMARKS = ("mme", "pope", "mmbench")
ANCHORS = {
    "pope_f1": {"LLaVA-1.5-7B": 85.9, "BLIP-2": 85.3},
    "mmbench": {"LLaVA-1.5-7B": 64.3, "InstructBLIP-7B": 36.0},
}
"""Published results in percent (POPE: F1 averaged over its three splits; MMBench: circular accuracy)."""

log = logging.getLogger(__name__)


@dataclass
class Suite:
    """Each chosen benchmark's questions, read and checked; a benchmark left out is None."""

    mme: dict[str, list[mme.Item]] | None = None
    pope: dict[str, list[pope.Question]] | None = None
    mmbench: list[mmbench.Question] | None = None
    prompt_suffix: str | None = DEFAULT_SUFFIX
    circular: bool = True
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def chosen(self) -> list[str]:
        return [name for name in BENCHMARKS if getattr(self, name) is not None]


def read_suite(mme_root: str | Path | None = None, pope_root: str | Path | None = None,
               pope_images: str | Path | None = None, pope_splits: Sequence[str] = pope.SPLITS,
               mmbench_tsv: str | Path | None = None, prompt_suffix: str | None = DEFAULT_SUFFIX,
               circular: bool = True) -> Suite:
    """Read every benchmark given; a broken file raises one line naming it before any model is loaded."""
    if not (mme_root or pope_root or mmbench_tsv):
        raise EvalOptionError("eval all needs at least one benchmark: --mme-root, --pope-root (with --images) or --tsv")
    if bool(pope_root) != bool(pope_images):
        raise EvalOptionError("--pope-root and --images go together (POPE's question files and COCO val2014 images)")
    unknown = [s for s in pope_splits if s not in pope.SPLITS]
    if unknown or not pope_splits:
        raise EvalOptionError(f"--splits takes {', '.join(pope.SPLITS)}; got {','.join(pope_splits)!r}")
    suite = Suite(prompt_suffix=prompt_suffix, circular=circular)
    if mme_root:
        suite.mme = mme.read_mme(mme_root)
        suite.sources["mme"] = str(mme_root)
    if pope_root:
        suite.pope = pope.read_pope(pope_root, pope_images, pope_splits)
        suite.sources["pope"] = f"{pope_root} (images {pope_images})"
    if mmbench_tsv:
        suite.mmbench = mmbench.read_mmbench(mmbench_tsv)
        suite.sources["mmbench"] = str(mmbench_tsv)
    return suite


def evaluate_suite(answer_fn_for: Callable[[str], AnswerFn], suite: Suite, out_dir: str | Path, batch_size: int = 16,
                   progress: bool = True, title: str = "",
                   on_done: Callable[[str, dict], None] | None = None) -> dict:
    """Run every chosen benchmark into ``out_dir/<benchmark>/``, then write and return the combined summary.

    Seconds are wall time per benchmark (answering, scoring and writing its files), so the sum is what the run took
    after the files were read. `on_done(name, result)` is called as each benchmark finishes (the bench prints its
    line then, so a run cut short still reports the finished ones).
    """
    out_dir = Path(out_dir)
    results: dict[str, dict] = {}
    for name in suite.chosen:
        start = time.perf_counter()
        answer_fn, where = answer_fn_for(name), out_dir / name
        if name == "mme":
            summary = mme.evaluate_mme(answer_fn, suite.mme, where, batch_size, suite.prompt_suffix, progress)
            questions = asked = sum(len(items) for items in suite.mme.values())
        elif name == "pope":
            summary = pope.evaluate_pope(answer_fn, suite.pope, where, batch_size, suite.prompt_suffix, progress)
            questions = asked = sum(len(items) for items in suite.pope.values())
        else:
            summary = mmbench.evaluate_mmbench(answer_fn, suite.mmbench, where, batch_size, suite.circular, progress)
            questions = len(suite.mmbench)
            asked = sum(len(mmbench.rotations(q, suite.circular)) for q in suite.mmbench)
        seconds = time.perf_counter() - start
        results[name] = {"summary": summary, "questions": questions, "asked": asked, "seconds": seconds,
                         "source": suite.sources.get(name, "")}
        log.info("%s: %d questions (%d asked) in %.1f s", name, questions, asked, seconds)
        if on_done is not None:
            on_done(name, results[name])
    combined = {"title": title, "benchmarks": results, "headline": headline(results), "anchors": ANCHORS,
                "total_seconds": sum(r["seconds"] for r in results.values())}
    write_report(out_dir, combined)
    return combined


# ---------------------------------------------------------------------------------------------------------------------
# The combined report


def headline(results: Mapping[str, Mapping]) -> list[dict]:
    """The one or two numbers per benchmark that papers quote, with the anchors that compare to them."""
    rows = []
    if "mme" in results:
        s = results["mme"]["summary"]
        rows.append({"benchmark": "MME", "metric": "perception (max 2000)", "ours": s["perception"], "anchors": {}})
        rows.append({"benchmark": "MME", "metric": "cognition (max 800)", "ours": s["cognition"], "anchors": {}})
    if "pope" in results:
        avg, n = results["pope"]["summary"]["average"], len(results["pope"]["summary"]["splits"])
        rows.append({"benchmark": "POPE", "metric": f"F1, mean of {n} split(s)", "ours": 100 * avg["f1"],
                     "anchors": ANCHORS["pope_f1"]})
        rows.append({"benchmark": "POPE", "metric": "accuracy", "ours": 100 * avg["accuracy"], "anchors": {}})
    if "mmbench" in results:
        s = results["mmbench"]["summary"]
        kind = "circular" if s["circular"] else "single pass"
        rows.append({"benchmark": "MMBench", "metric": f"accuracy ({kind})", "ours": s["overall"],
                     "anchors": ANCHORS["mmbench"]})
    return rows


def _anchor_names(rows: Sequence[Mapping]) -> list[str]:
    return list(dict.fromkeys(name for row in rows for name in row["anchors"]))


def format_report(combined: Mapping) -> str:
    """Markdown: the headline table with anchors, the time per benchmark, then each benchmark's own table."""
    rows, names = combined["headline"], _anchor_names(combined["headline"])
    lines = [f"# Evaluation {combined['title']}".rstrip(), "",
             "| Benchmark | Metric | Ours | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for row in rows:
        ours = "n/a" if row["ours"] is None else f"**{row['ours']:.2f}**"
        cells = [f"{row['anchors'][n]:.1f}" if n in row["anchors"] else "" for n in names]
        lines.append(f"| {row['benchmark']} | {row['metric']} | {ours} | " + " | ".join(cells) + " |")
    lines += ["", "Anchors: published results (POPE: F1 averaged over its three splits; MMBench: circular accuracy).",
              "", "| Benchmark | Questions | Asked | Seconds | Asked/s |", "|---|---:|---:|---:|---:|"]
    for name, r in combined["benchmarks"].items():
        lines.append(f"| {name} | {r['questions']} | {r['asked']} | {r['seconds']:.1f} | "
                     f"{r['asked'] / max(r['seconds'], 1e-9):.1f} |")
    lines.append(f"| **total** | | | **{combined['total_seconds']:.1f}** | |")
    tables = {"mme": mme.format_table, "pope": pope.format_table, "mmbench": mmbench.format_table}
    for name, r in combined["benchmarks"].items():
        lines += ["", f"## {name.upper() if name != 'mmbench' else 'MMBench'} ({r['source']})", "",
                  tables[name](r["summary"]).rstrip()]
    return "\n".join(lines) + "\n"


def plot_report(combined: Mapping, path: str | Path) -> None:
    """One panel per headline metric, our bar first and the anchors below it (Agg canvas: no GUI state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = combined["headline"]
    fig = Figure(figsize=(7, 0.6 * len(rows) + 0.35 * sum(1 + len(r["anchors"]) for r in rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, rows):
        labels = ["ours", *row["anchors"]]
        values = [row["ours"] or 0.0, *row["anchors"].values()]
        ax.barh(labels, values, color=["tab:blue"] + ["tab:gray"] * len(row["anchors"]))
        ax.invert_yaxis()
        top = 2000 if "max 2000" in row["metric"] else 800 if "max 800" in row["metric"] else 100
        ax.set_xlim(0, top)
        ax.set_title(f"{row['benchmark']}: {row['metric']}", fontsize=9, loc="left")
        for y, value in enumerate(values):
            ax.text(value + top / 100, y, f"{value:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(out_dir: str | Path, combined: Mapping) -> None:
    write_summary(out_dir, combined, format_report(combined), plot_report if combined["headline"] else None)
