"""Benchmarks during training: the hook `minigpt4qwen train` hands to the training loop (which imports no eval code).

    minigpt4qwen train --config cfg.yaml eval.every_n_epochs=1 eval.mme_root=MME eval.pope_root=POPE \
        eval.pope_images=coco/val2014 eval.mmbench_tsv=mmbench_dev_20230712.tsv

Each benchmark set in ``eval.*`` is scored on the weights of every ``every_n_epochs``-th epoch, right after its
checkpoint: results in RUN_DIR/eval/step-N/ (the same report as `eval all`), scalars in TensorBoard.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config
from .pope import METRICS
from .run import AssistantAnswers
from .suite import Suite, evaluate_suite, read_suite

log = logging.getLogger(__name__)


def training_evaluator(cfg: Config) -> TrainingEval | None:
    """The hook for ``train(..., evaluate=...)``, or None when ``cfg.eval`` asks for no benchmark.

    The files are read here, before training starts, so that a broken one fails now and not after the first epoch.
    """
    ec = cfg.eval
    if ec.every_n_epochs <= 0 or not (ec.mme_root or ec.pope_root or ec.mmbench_tsv):
        return None
    return TrainingEval(read_suite(ec.mme_root, ec.pope_root, ec.pope_images, ec.pope_splits, ec.mmbench_tsv,
                                   ec.prompt_suffix, ec.mmbench_circular))


class TrainingEval:
    """Called by the loop as ``evaluate(cfg, model, tokenizer, template, run_dir, step, writer)`` on rank 0."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite

    def __call__(self, cfg: Config, model, tokenizer, template, run_dir: Path, step: int, writer) -> dict:
        from ..data.images import ImageProcessor
        from ..runs import image_size
        from ..serve.generate import Assistant

        assistant = Assistant(model, tokenizer, template, ImageProcessor(image_size(cfg, model), train=False))
        answers = AssistantAnswers(assistant, cfg.eval.max_new_tokens)
        combined = evaluate_suite(lambda _: answers, self.suite, Path(run_dir) / "eval" / f"step-{step:08d}",
                                  cfg.eval.batch_size, progress=False, title=f"at step {step}")
        log_scalars(writer, combined, step)
        log.info("evaluation at step %d: %s", step,
                 ", ".join(f"{r['benchmark']} {r['metric']} {r['ours']:.2f}" for r in combined["headline"]
                           if r["ours"] is not None))
        return combined


def log_scalars(writer, combined: dict, step: int) -> None:
    """mme/<total or subtask> as MME scores; pope/<split>/<metric> and mmbench/* in percent; eval/seconds/*."""
    results = combined["benchmarks"]
    if "mme" in results:
        s = results["mme"]["summary"]
        writer.add_scalar("mme/perception", s["perception"], step)
        writer.add_scalar("mme/cognition", s["cognition"], step)
        for name, sub in s["subtasks"].items():
            writer.add_scalar(f"mme/{name}", sub["score"], step)
    if "pope" in results:
        s = results["pope"]["summary"]
        for split, scores in [*s["splits"].items(), ("average", s["average"])]:
            for metric in METRICS:
                writer.add_scalar(f"pope/{split}/{metric}", 100 * scores[metric], step)
    if "mmbench" in results and results["mmbench"]["summary"]["overall"] is not None:
        s = results["mmbench"]["summary"]
        writer.add_scalar("mmbench/overall", s["overall"], step)
        writer.add_scalar("mmbench/first_round", s["first_round"], step)
        for name, cat in s["categories"].items():
            writer.add_scalar(f"mmbench/category/{name}", cat["accuracy"], step)
    for name, r in results.items():
        writer.add_scalar(f"eval/seconds/{name}", r["seconds"], step)
