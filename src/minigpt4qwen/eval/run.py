"""Evaluation entry points that need the model: MME on a checkpoint, and the held-out exact-match score.

    minigpt4qwen eval mme --checkpoint RUN_DIR --mme-root DIR [--out DIR] [--batch-size 32]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..data.conversation import IMAGE_PROMPT, Turn
from .mme import DEFAULT_SUFFIX, evaluate_mme, format_table

log = logging.getLogger(__name__)


def mme_answer_fn(assistant, max_new_tokens: int = 8):
    """Batched greedy answers through the shared generation path (what chat and the API use)."""
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


def add_eval_args(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (MME benchmark)")
    which = p.add_subparsers(dest="benchmark", required=True)
    m = which.add_parser("mme", help="MME perception/cognition scores in MME's result format")
    m.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    m.add_argument("--mme-root", required=True, help="MME benchmark folder (one folder per subtask)")
    m.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval/mme-<checkpoint name>)")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--prompt-suffix", default=DEFAULT_SUFFIX)
    m.add_argument("--max-new-tokens", type=int, default=8)
    m.add_argument("--device", default=None)
    m.set_defaults(fn=cmd_eval)


def cmd_eval(args) -> int:
    from ..serve.generate import Assistant

    assistant = Assistant.from_run(args.checkpoint, device=args.device)
    run = assistant.run
    out = Path(args.out) if args.out else run.run_dir / "eval" / f"mme-{run.checkpoint.name}"
    summary = run_mme(assistant, args.mme_root, out, args.batch_size, args.prompt_suffix, args.max_new_tokens)
    print(format_table(summary))
    print(f"perception {summary['perception']:.2f}  cognition {summary['cognition']:.2f}  ->  {out}")
    (out / "command.json").write_text(json.dumps(vars(args), default=str, indent=1))
    return 0
