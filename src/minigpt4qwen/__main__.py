"""`minigpt4qwen` command: one subcommand per workflow.

    minigpt4qwen demo                                   # offline: data -> train -> evaluate -> answer
    minigpt4qwen train --config configs/demo.yaml [key.sub=value ...] [--resume RUN_DIR]
    minigpt4qwen chat --checkpoint RUN_DIR --image img.png [--query "..."]
    minigpt4qwen predict --checkpoint RUN_DIR --input questions.jsonl --out answers.jsonl   # batched, resumable
    minigpt4qwen webui --checkpoint RUN_DIR             # Gradio UI on 127.0.0.1:7860
    minigpt4qwen serve --checkpoint RUN_DIR             # OpenAI-compatible API on 127.0.0.1:8000
    minigpt4qwen eval mme|pope|mmbench|all --checkpoint RUN_DIR ...   # benchmarks, one report
    minigpt4qwen convert lavis|qwen1|export|to-transformers|seed-projector|to-seed|zero-to-safetensors ...
    minigpt4qwen info --config FILE.yaml                # parameter counts on the meta device
    minigpt4qwen bench all                              # speed of the seed-style vs our path (GPU)
    minigpt4qwen make-data --out DIR                    # the synthetic shapes data set
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("minigpt4qwen")


def _train(args) -> int:
    from pathlib import Path

    from .config import load_config
    from .eval.training import training_evaluator
    from .runs import CONFIG, read_run_config
    from .train.loop import train

    # the config is read here too so that the benchmark files of eval.* are checked before training starts
    if args.resume and not args.config:
        cfg = read_run_config(args.resume, args.overrides) if (Path(args.resume) / CONFIG).is_file() else None
        evaluate = training_evaluator(cfg) if cfg is not None else None  # no config: train() names the problem
        run = train(resume=args.resume, overrides=args.overrides, evaluate=evaluate)
    else:
        if not args.config:
            raise SystemExit("train needs --config FILE.yaml (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        run = train(cfg, resume=args.resume, overwrite=args.overwrite, evaluate=training_evaluator(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {run}")
    return 0


def _chat(args) -> int:
    from .serve.cli import run_chat

    return run_chat(args)


def _predict(args) -> int:
    from .serve.predict import run_predict

    return run_predict(args)


def _webui(args) -> int:
    from .serve.webui import run_webui

    return run_webui(args)


def _serve(args) -> int:
    from .serve.api import run_api

    return run_api(args)


def _make_data(args) -> int:
    from .data.synthetic import write_dataset

    info = write_dataset(args.out, n_train=args.n_train, n_heldout=args.n_heldout, image_size=args.image_size,
                         seed=args.seed, yes_no_share=args.yes_no_share)
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minigpt4qwen", description=__doc__.split("\n\n")[0])
    # the deepspeed launcher puts --local_rank before the subcommand (python -m minigpt4qwen --local_rank=N train ...);
    # the rank is read from LOCAL_RANK, the option is only accepted
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train from a YAML config (dotted key=value overrides after it)")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--resume", help="run directory to continue from its newest checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="delete a run already in train.output_dir and start afresh (default: refuse)")
    t.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed launcher
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 data.max_txt_len=128")
    t.set_defaults(fn=_train)

    from .serve.args import add_compile_decode_arg, add_quantize_arg
    from .serve.cli import add_generation_args

    c = sub.add_parser("chat", help="chat about images in the terminal (streaming)")
    c.add_argument("--checkpoint", required=True, help="run directory (or one of its checkpoint directories)")
    c.add_argument("--image", action="append", help="image path (repeat for several images)")
    c.add_argument("--query", help="ask once, print the answer and exit")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_compile_decode_arg(c)
    add_quantize_arg(c)
    add_generation_args(c)
    c.set_defaults(fn=_chat)

    from .serve.predict import add_predict_args

    pr = sub.add_parser("predict", help="answer a JSONL file of questions about images, batched and resumable")
    add_predict_args(pr)
    pr.set_defaults(fn=_predict)

    m = sub.add_parser("make-data", help="write the synthetic shapes data set (seed + LLaVA JSON, MME layout)")
    m.add_argument("--out", required=True)
    m.add_argument("--n-train", type=int, default=2000)
    m.add_argument("--n-heldout", type=int, default=200)
    m.add_argument("--image-size", type=int, default=96)
    m.add_argument("--yes-no-share", type=float, default=0.0,
                   help="share of training conversations that also get an MME-style yes/no question")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=_make_data)

    from .serve.args import add_serve_args, add_webui_args

    w = sub.add_parser("webui", help="Gradio web UI: upload images, chat with streamed answers")
    add_webui_args(w)
    w.set_defaults(fn=_webui)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API with request batching")
    add_serve_args(s)
    s.set_defaults(fn=_serve)

    from .convert_cli import add_convert_args, add_info_args

    add_convert_args(sub)
    add_info_args(sub)

    from .bench import add_bench_args, run_bench

    b = sub.add_parser("bench", help="throughput on real-size presets with random weights: train | generate | eval")
    add_bench_args(b)
    b.set_defaults(fn=run_bench)

    from .eval.run import add_eval_args

    add_eval_args(sub)

    d = sub.add_parser("demo", help="offline end-to-end demo on CPU: data, training, held-out accuracy, answers")
    d.add_argument("--out", default="demo_runs/demo", help="output folder (data + runs)")
    d.add_argument("--fast", action="store_true", help="reduced budget (used by the tests)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data, the vision pretraining and the training")
    d.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from .config import ConfigError
    from .data.conversation import OverlongError
    from .data.formats import BadSampleError
    from .data.images import ImageError
    from .eval.report import EvalOptionError
    from .models.convert import CheckpointKeyError
    from .models.minigpt4qwen import CheckpointMismatchError
    from .serve.quantize import QuantizeError

    try:
        return int(args.fn(args) or 0)
    except (ConfigError, BadSampleError, ImageError, OverlongError, CheckpointMismatchError, CheckpointKeyError,
            EvalOptionError, QuantizeError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
