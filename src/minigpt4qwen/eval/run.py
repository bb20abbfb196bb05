"""Evaluation entry points that need the model: MME, POPE and MMBench on a checkpoint.

    minigpt4qwen eval mme --checkpoint RUN_DIR --mme-root DIR [--out DIR] [--batch-size 32]
    minigpt4qwen eval pope --checkpoint RUN_DIR --pope-root DIR --images COCO/val2014 [--splits random,popular]
    minigpt4qwen eval mmbench --checkpoint RUN_DIR --tsv mmbench_dev_20230712.tsv [--no-circular]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..data.conversation import IMAGE_PROMPT, Turn
from . import mmbench, pope
from .mme import DEFAULT_SUFFIX, evaluate_mme, format_table

log = logging.getLogger(__name__)


def mme_answer_fn(assistant, max_new_tokens: int = 8):
    """Batched greedy answers through the shared generation path (what chat and the API use); MME, POPE and
    MMBench all ask through it. An image may be a path or a PIL image."""
    from ..serve.generate import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens)

    def answer(batch: list[tuple[Path, str]]) -> list[str]:
        convs = [[Turn("user", f"{IMAGE_PROMPT} {prompt}")] for _, prompt in batch]
        return assistant.generate(convs, [[image] for image, _ in batch], settings)

    return answer


def run_mme(assistant, mme_root: str | Path, out_dir: str | Path, batch_size: int = 32,
            prompt_suffix: str = DEFAULT_SUFFIX, max_new_tokens: int = 8) -> dict:
    return evaluate_mme(mme_answer_fn(assistant, max_new_tokens), mme_root, out_dir, batch_size=batch_size,
                        prompt_suffix=prompt_suffix)


def mme_during_training(cfg, model, tokenizer, template, run_dir: Path, step: int, writer) -> dict | None:
    """The training loop's evaluation hook (`train(..., evaluate=mme_during_training)`, what `minigpt4qwen train`
    passes): MME on the weights just trained when `eval.mme_root` is set; scores go to TensorBoard and
    RUN_DIR/eval/mme-step-N/."""
    if not cfg.eval.mme_root:
        return None
    from ..data.images import ImageProcessor
    from ..runs import image_size
    from ..serve.generate import Assistant

    assistant = Assistant(model, tokenizer, template, ImageProcessor(image_size(cfg, model), train=False))
    summary = run_mme(assistant, cfg.eval.mme_root, Path(run_dir) / "eval" / f"mme-step-{step:08d}",
                      cfg.eval.batch_size, cfg.eval.prompt_suffix, cfg.eval.max_new_tokens)
    writer.add_scalar("mme/perception", summary["perception"], step)
    writer.add_scalar("mme/cognition", summary["cognition"], step)
    for name, sub in summary["subtasks"].items():
        writer.add_scalar(f"mme/{name}", sub["score"], step)
    log.info("MME at step %d: perception %.2f cognition %.2f", step, summary["perception"], summary["cognition"])
    return summary


def _checkpoint_args(p, batch_size: int, max_new_tokens: int) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval/<benchmark>-<checkpoint name>)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--device", default=None)


def add_eval_args(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (MME, POPE, MMBench)")
    which = p.add_subparsers(dest="benchmark", required=True)
    m = which.add_parser("mme", help="MME perception/cognition scores in MME's result format")
    m.add_argument("--mme-root", required=True, help="MME benchmark folder (one folder per subtask)")
    m.add_argument("--prompt-suffix", default=DEFAULT_SUFFIX)
    _checkpoint_args(m, 32, 8)
    m.set_defaults(fn=cmd_eval)
    po = which.add_parser("pope", help="POPE hallucination scores (accuracy, precision, recall, F1, yes-ratio)")
    po.add_argument("--pope-root", required=True, help="folder holding coco_pope_<split>.json (or coco/, output/coco/)")
    po.add_argument("--images", required=True, help="COCO val2014 image folder")
    po.add_argument("--splits", default=",".join(pope.SPLITS), help="comma-separated: random,popular,adversarial")
    po.add_argument("--prompt-suffix", default=DEFAULT_SUFFIX)
    _checkpoint_args(po, 32, 16)
    po.set_defaults(fn=cmd_pope)
    mb = which.add_parser("mmbench", help="MMBench accuracy (circular) and a submission file from the official TSV")
    mb.add_argument("--tsv", required=True, help="MMBench TSV (index, question, hint, A-D, answer, category, image)")
    mb.add_argument("--no-circular", dest="circular", action="store_false",
                    help="ask each question once instead of once per rotation of its options")
    _checkpoint_args(mb, 32, 8)
    mb.set_defaults(fn=cmd_mmbench)


def _load(args, benchmark: str):
    """The assistant for ``args.checkpoint`` and the output folder (default RUN_DIR/eval/<benchmark>-<ckpt>)."""
    from ..serve.generate import Assistant

    assistant = Assistant.from_run(args.checkpoint, device=args.device)
    run = assistant.run
    out = Path(args.out) if args.out else run.run_dir / "eval" / f"{benchmark}-{run.checkpoint.name}"
    return assistant, out


def _finish(args, out: Path, table: str, line: str) -> int:
    print(table)
    print(f"{line}  ->  {out}")
    (out / "command.json").write_text(json.dumps(vars(args), default=str, indent=1))
    return 0


def cmd_eval(args) -> int:
    assistant, out = _load(args, "mme")
    summary = run_mme(assistant, args.mme_root, out, args.batch_size, args.prompt_suffix, args.max_new_tokens)
    return _finish(args, out, format_table(summary),
                   f"perception {summary['perception']:.2f}  cognition {summary['cognition']:.2f}")


def cmd_pope(args) -> int:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in splits if s not in pope.SPLITS]
    if unknown or not splits:
        raise SystemExit(f"error: --splits takes {', '.join(pope.SPLITS)}; got {args.splits!r}")
    data = pope.read_pope(args.pope_root, args.images, splits)  # a broken file fails before the model loads
    assistant, out = _load(args, "pope")
    summary = pope.evaluate_pope(mme_answer_fn(assistant, args.max_new_tokens), data, out, args.batch_size,
                                 args.prompt_suffix)
    avg = summary["average"]
    return _finish(args, out, pope.format_table(summary),
                   f"POPE average accuracy {100 * avg['accuracy']:.2f}  F1 {100 * avg['f1']:.2f}")


def cmd_mmbench(args) -> int:
    questions = mmbench.read_mmbench(args.tsv)  # a broken row fails before the model loads
    assistant, out = _load(args, "mmbench")
    summary = mmbench.evaluate_mmbench(mme_answer_fn(assistant, args.max_new_tokens), questions, out,
                                       args.batch_size, args.circular)
    overall = "no ground truth" if summary["overall"] is None else f"{summary['overall']:.2f}"
    return _finish(args, out, mmbench.format_table(summary), f"MMBench accuracy {overall}")
