"""Evaluation entry points that need the model: MME, POPE, MMBench or all three on a checkpoint.

    minigpt4qwen eval mme --checkpoint RUN_DIR --mme-root DIR [--out DIR] [--batch-size 32]
    minigpt4qwen eval pope --checkpoint RUN_DIR --pope-root DIR --images COCO/val2014 [--splits random,popular]
    minigpt4qwen eval mmbench --checkpoint RUN_DIR --tsv mmbench_dev_20230712.tsv [--no-circular]
    minigpt4qwen eval all --checkpoint RUN_DIR --mme-root DIR --pope-root DIR --images DIR --tsv FILE.tsv

Every command reads and checks its files and options before the model is loaded; a problem is one `error:` line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from ..data.conversation import IMAGE_PROMPT, Turn
from ..data.images import load_image
from ..serve.args import add_quantize_arg
from . import mmbench, pope, suite
from .mme import DEFAULT_SUFFIX, evaluate_mme, format_table, read_mme
from .report import EvalOptionError, Request, at_least_one

log = logging.getLogger(__name__)

DEFAULT_NEW_TOKENS = {"mme": 8, "pope": 16, "mmbench": 8}
"""Answer length per benchmark: a word or a letter, except POPE, whose parser reads the first sentence."""


class AssistantAnswers:
    """Batched greedy answers through the shared generation path (what chat and the API use; on CUDA that is the
    fast decoder). An image may be a path or a PIL image."""

    def __init__(self, assistant, max_new_tokens: int = 8) -> None:
        from ..serve.generate import GenerationSettings

        self.assistant = assistant
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens)

    def __call__(self, batch: list[Request]) -> list[str]:
        convs = [[Turn("user", f"{IMAGE_PROMPT} {prompt}")] for _, prompt in batch]
        return self.assistant.generate(convs, [[image] for image, _ in batch], self.settings)

    def load(self, image) -> Image.Image | torch.Tensor:
        """Run in ask_all's threads ahead of the batch: decode and, for the eval-time (resize-only, deterministic)
        processor, also resize and normalise: the model's input tensor, the same one the processor makes in
        `Assistant.prepare`, which takes it as it is. Only the time moves off the GPU's critical path (about 1 ms
        per image on one core, more with torch's intra-op threads on many-core hosts)."""
        img = (image if isinstance(image, Image.Image) else load_image(image)).convert("RGB")
        processor = self.assistant.processor
        return img if processor.train else processor(img)


def _checkpoint_args(p, batch_size: int, max_new_tokens: int | None) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval/<benchmark>-<checkpoint name>)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="questions per generate call")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="answer length limit" + ("" if max_new_tokens else " (default: mme 8, pope 16, mmbench 8)"))
    p.add_argument("--device", default=None)
    add_quantize_arg(p)


def _pope_args(p, required: bool) -> None:
    p.add_argument("--pope-root", required=required,
                   help="folder holding coco_pope_<split>.json (or coco/, output/coco/)")
    p.add_argument("--images", required=required, help="COCO val2014 image folder (for POPE)")
    p.add_argument("--splits", default=",".join(pope.SPLITS), help="POPE splits, comma-separated")


def _mmbench_args(p, required: bool) -> None:
    p.add_argument("--tsv", required=required,
                   help="MMBench TSV (index, question, hint, A-D, answer, category, image)")
    p.add_argument("--no-circular", dest="circular", action="store_false",
                   help="ask each MMBench question once instead of once per rotation of its options")


def add_eval_args(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (MME, POPE, MMBench, or all)")
    which = p.add_subparsers(dest="benchmark", required=True)
    m = which.add_parser("mme", help="MME perception/cognition scores in MME's result format")
    m.add_argument("--mme-root", required=True, help="MME benchmark folder (one folder per subtask)")
    m.add_argument("--prompt-suffix", default=DEFAULT_SUFFIX)
    _checkpoint_args(m, 32, DEFAULT_NEW_TOKENS["mme"])
    m.set_defaults(fn=cmd_eval)
    po = which.add_parser("pope", help="POPE hallucination scores (accuracy, precision, recall, F1, yes-ratio)")
    _pope_args(po, required=True)
    po.add_argument("--prompt-suffix", default=DEFAULT_SUFFIX)
    _checkpoint_args(po, 32, DEFAULT_NEW_TOKENS["pope"])
    po.set_defaults(fn=cmd_pope)
    mb = which.add_parser("mmbench", help="MMBench accuracy (circular) and a submission file from the official TSV")
    _mmbench_args(mb, required=True)
    _checkpoint_args(mb, 32, DEFAULT_NEW_TOKENS["mmbench"])
    mb.set_defaults(fn=cmd_mmbench)
    a = which.add_parser("all", help="MME + POPE + MMBench in one run, one report (summary.json/.md, scores.png)")
    a.add_argument("--mme-root", help="MME benchmark folder")
    _pope_args(a, required=False)
    _mmbench_args(a, required=False)
    a.add_argument("--prompt-suffix", default=DEFAULT_SUFFIX, help="after MME and POPE questions")
    _checkpoint_args(a, 32, None)
    a.set_defaults(fn=cmd_all)


def _check(args) -> None:
    at_least_one(batch_size=args.batch_size)
    if args.max_new_tokens is not None:
        at_least_one(max_new_tokens=args.max_new_tokens)


def _splits(text: str) -> list[str]:
    splits = [s.strip() for s in text.split(",") if s.strip()]
    if not splits or any(s not in pope.SPLITS for s in splits):
        raise EvalOptionError(f"--splits takes {', '.join(pope.SPLITS)} (comma-separated); got {text!r}")
    return splits


def _load(args, benchmark: str):
    """The assistant for ``args.checkpoint`` and the output folder (default RUN_DIR/eval/<benchmark>-<ckpt>)."""
    from ..serve.generate import Assistant

    assistant = Assistant.from_args(args)
    run = assistant.run
    out = Path(args.out) if args.out else run.run_dir / "eval" / f"{benchmark}-{run.checkpoint.name}"
    return assistant, out


def _finish(args, out: Path, table: str, line: str) -> int:
    print(table)
    print(f"{line}  ->  {out}")
    (out / "command.json").write_text(json.dumps(vars(args), default=str, indent=1))
    return 0


def cmd_eval(args) -> int:
    _check(args)
    data = read_mme(args.mme_root)
    assistant, out = _load(args, "mme")
    summary = evaluate_mme(AssistantAnswers(assistant, args.max_new_tokens), data, out, args.batch_size,
                           args.prompt_suffix)
    return _finish(args, out, format_table(summary),
                   f"perception {summary['perception']:.2f}  cognition {summary['cognition']:.2f}")


def cmd_pope(args) -> int:
    _check(args)
    data = pope.read_pope(args.pope_root, args.images, _splits(args.splits))
    assistant, out = _load(args, "pope")
    summary = pope.evaluate_pope(AssistantAnswers(assistant, args.max_new_tokens), data, out, args.batch_size,
                                 args.prompt_suffix)
    avg = summary["average"]
    return _finish(args, out, pope.format_table(summary),
                   f"POPE average accuracy {100 * avg['accuracy']:.2f}  F1 {100 * avg['f1']:.2f}")


def cmd_mmbench(args) -> int:
    _check(args)
    questions = mmbench.read_mmbench(args.tsv)
    assistant, out = _load(args, "mmbench")
    summary = mmbench.evaluate_mmbench(AssistantAnswers(assistant, args.max_new_tokens), questions, out,
                                       args.batch_size, args.circular)
    overall = "no ground truth" if summary["overall"] is None else f"{summary['overall']:.2f}"
    return _finish(args, out, mmbench.format_table(summary), f"MMBench accuracy {overall}")


def cmd_all(args) -> int:
    _check(args)
    data = suite.read_suite(args.mme_root, args.pope_root, args.images, _splits(args.splits), args.tsv,
                            args.prompt_suffix, args.circular)
    assistant, out = _load(args, "all")
    answers = {name: AssistantAnswers(assistant, args.max_new_tokens or DEFAULT_NEW_TOKENS[name])
               for name in data.chosen}
    combined = suite.evaluate_suite(answers.__getitem__, data, out, args.batch_size,
                                    title=f"of {assistant.run.checkpoint}")
    return _finish(args, out, suite.format_report(combined),
                   f"{len(data.chosen)} benchmark(s) in {combined['total_seconds']:.1f} s")
