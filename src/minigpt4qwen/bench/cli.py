"""`minigpt4qwen bench` options and the run: build once, then every section's variants, one JSON line each."""

from __future__ import annotations

import argparse
import logging
from functools import partial

import torch

from ..train.engines import resolve_device
from .common import Bench
from .eval import EVAL_VARIANTS, SUITES, eval_section, suite_section
from .generate import GENERATE_VARIANTS, generate_section
from .serve import serve_section
from .train import DEFAULT_TRAIN, fp8_gate, objective_check, parse_train_variant, probe_memory, train_variant

PRESETS = {"7b": ("eva-vit-g", "blip2-qformer", "random:qwen-7b"), "tiny": ("tiny", "tiny", "random:tiny-qwen2")}


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Options of `minigpt4qwen bench`; defaults marked 'cuda/cpu' differ so that CPU runs take seconds."""
    p.add_argument("what", nargs="?", default="all",
                   choices=("train", "generate", "eval", "serve", "fp8-gate", "all"),
                   help="all = train + generate + eval; serve (the HTTP API under load) and fp8-gate (fp8 against "
                        "bf16 training: final loss and greedy answers) run only when named")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model sizes (default 7b on CUDA, tiny on CPU)")
    p.add_argument("--vision", help="vision preset (default eva-vit-g on CUDA, tiny on CPU)")
    p.add_argument("--qformer", help="Q-Former preset (default blip2-qformer on CUDA, tiny on CPU)")
    p.add_argument("--llm", help="LLM (default random:qwen-7b on CUDA, random:tiny-qwen2 on CPU)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: a tiny byte-level BPE built in-process)")
    p.add_argument("--num-query-tokens", type=int, default=32, help="image positions per image")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--variants", help="comma list; default: all of the chosen section(s)")
    p.add_argument("--batch-size", type=int,
                   help="training micro-batch (cuda 32 / cpu 4); a -bN variant suffix overrides it")
    p.add_argument("--steps", type=int, help="measured training steps (cuda 10 / cpu 2)")
    p.add_argument("--warmup", type=int,
                   help="untimed steps first (cuda: one pass over the timed batches, so every shape has met the "
                        "allocator and cuBLAS before timing / cpu 1)")
    p.add_argument("--seq-min", type=int, default=64, help="text tokens per sample, lower bound")
    p.add_argument("--seq-max", type=int, default=256, help="text tokens per sample, upper bound")
    p.add_argument("--answer-frac", type=float, default=0.3, help="share of text tokens supervised (trailing span)")
    p.add_argument("--gen-tokens", type=int, help="new tokens of the batch-1 decode test (cuda 128 / cpu 8)")
    p.add_argument("--gen-prompt", type=int, default=64, help="text tokens of the decode prompt (+ image positions)")
    p.add_argument("--gen-repeats", type=int, help="timed decode runs (cuda 2 / cpu 1)")
    p.add_argument("--gen-answers", type=int,
                   help="prompts whose greedy answers quantized/compiled variants compare with bf16 (cuda 64 / cpu 2)")
    p.add_argument("--eval-questions", type=int, help="yes/no questions (cuda 2374 = MME / cpu 24)")
    p.add_argument("--eval-batch", type=int, help="questions per generate call (cuda 128 / cpu 8)")
    p.add_argument("--eval-new-tokens", type=int,
                   help="answer tokens (--suite model: 3; else eval all's own: mme 8, pope 16, mmbench 8)")
    p.add_argument("--suite", choices=SUITES, default="model",
                   help="eval: model = decoder comparison on token ids; mme/pope/mmbench/all = `eval all`'s path on "
                        "official-size synthetic files")
    p.add_argument("--mme-questions", type=int, help="--suite: MME questions (cuda 2374 / cpu 8)")
    p.add_argument("--pope-questions", type=int, help="--suite: POPE questions per split (cuda 3000 / cpu 6)")
    p.add_argument("--mmbench-questions", type=int, help="--suite: MMBench questions (cuda 4377 / cpu 4)")
    p.add_argument("--image-px", type=int, help="--suite: image width, height 3/4 of it (cuda 640 / cpu 32)")
    p.add_argument("--data-dir", help="--suite: write the files and results here and keep them (default: a temp dir)")
    p.add_argument("--probe-memory", action="store_true", help="largest micro-batch of `fast`, with/without ckpt")
    p.add_argument("--probe-max", type=int, help="largest batch the probe tries (cuda 4096 / cpu 16)")
    p.add_argument("--budget-s", type=float, default=400.0, help="variants not started by then are reported skipped")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 2 steps of each training variant: GPU time by kernel class")
    p.add_argument("--serve-clients", default="1,8,32,64", help="serve: concurrent streaming clients, comma list")
    p.add_argument("--serve-modes", default="static,continuous", help="serve: batching modes compared in the run")
    p.add_argument("--serve-tokens", type=int, help="serve: new tokens per request (cuda 128 / cpu 8)")
    p.add_argument("--serve-requests", type=int, help="serve: requests each client sends in turn (cuda 2 / cpu 1)")
    p.add_argument("--serve-prompt-budget", type=int, default=512, help="serve: prompt tokens a request may take")
    p.add_argument("--serve-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="serve: a ServeOptions field for the run's servers, e.g. prefill_chunk=512 or "
                        "switch_interval_ms=5 or graph_vision=true (repeatable)")
    p.add_argument("--serve-compile", action="store_true",
                   help="serve: the decoders compiled, as `serve --compile-decode` (continuous: symbolic shapes)")
    p.add_argument("--gate-recipes", default="tensorwise,rowwise", help="fp8-gate: train.fp8 recipes, comma list")
    p.add_argument("--gate-steps", type=int, help="fp8-gate: training steps per run (cuda 200 / cpu 6)")
    p.add_argument("--gate-questions", type=int, help="fp8-gate: greedy-answered questions (cuda 512 / cpu 8)")
    p.add_argument("--gate-lr", type=float, default=1e-4, help="fp8-gate: AdamW learning rate of the projector")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also append the JSON lines to this file")


def _defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the device-dependent defaults (real size on CUDA, tiny and short on CPU)."""
    cuda = device.type == "cuda"
    table = {"batch_size": (32, 4), "steps": (10, 2), "warmup": (-1, 1), "gen_tokens": (128, 8), "gen_repeats": (2, 1),
             "gen_answers": (64, 2),
             "eval_questions": (2374, 24), "eval_batch": (128, 8), "probe_max": (4096, 16),
             "mme_questions": (2374, 8), "pope_questions": (3000, 6), "mmbench_questions": (4377, 4),
             "image_px": (640, 32), "serve_tokens": (128, 8), "serve_requests": (2, 1), "gate_steps": (200, 6),
             "gate_questions": (512, 8)}
    filled = {k: v[0 if cuda else 1] for k, v in table.items() if getattr(args, k, None) is None}
    vision, qformer, llm = PRESETS[args.preset or ("7b" if cuda else "tiny")]
    filled.update({k: v for k, v in (("vision", vision), ("qformer", qformer), ("llm", llm))
                   if getattr(args, k, None) is None})
    args = argparse.Namespace(**{**vars(args), **filled})
    if args.steps < 1 or args.warmup < -1 or not 0 < args.seq_min <= args.seq_max:
        raise ValueError("need --steps >= 1, --warmup >= 0 (-1: one pass over the batches) and "
                         "0 < --seq-min <= --seq-max")
    if args.gate_steps < 1 or args.gate_questions < 1 or not set(args.gate_recipes.split(",")) <= {
            "tensorwise", "rowwise"}:
        raise ValueError("need --gate-steps >= 1, --gate-questions >= 1 and --gate-recipes from tensorwise,rowwise")
    return args


def compiles(variant: str) -> bool:
    return "compile" in variant or "autotune" in variant


def split_variants(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str], list[str]]:
    """(train, generate, eval) variants for `what`; unknown names fail before the model is built."""
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    sections = {"train": [], "generate": [], "eval": []}
    for v in wanted or []:
        decode = v in GENERATE_VARIANTS or v.startswith("fast-decode")
        kind = "generate" if decode else "eval" if v in EVAL_VARIANTS else "train"
        if kind == "train":
            parse_train_variant(v)
        sections[kind].append(v)
    if wanted is None:
        keep = [v for v in (*DEFAULT_TRAIN, *GENERATE_VARIANTS, *EVAL_VARIANTS)
                if device.type == "cuda" or not compiles(v)]  # compiling on CPU takes minutes: CUDA only
        sections = {"train": [v for v in DEFAULT_TRAIN if v in keep],
                    "generate": [v for v in GENERATE_VARIANTS if v in keep],
                    "eval": [v for v in EVAL_VARIANTS if v in keep]}
    chosen = ("train", "generate", "eval") if args.what == "all" else (args.what,)  # serve: none of them
    return tuple(sections[k] if k in chosen else [] for k in ("train", "generate", "eval"))  # type: ignore[return-value]


def print_table(records: list[dict]) -> None:
    cols = ("samples_per_s", "tokens_per_s", "step_s", "mfu", "peak_mem_gib")
    print(f"{'variant':<26}" + "".join(f"{c:>15}" for c in cols) + "  note")
    for r in records:
        vals = "".join(f"{r[c]:>15.4g}" if isinstance(r.get(c), float) else f"{'-':>15}" for c in cols)
        note = r.get("error") or ", ".join(f"{k}={r[k]}" for k in ("batch_size", "max_batch", "match_hf", "abs_diff",
                                                                   "total_s", "ttft_p50_s", "itl_p95_s",
                                                                   "loss_rel_diff", "answers_agree", "passed",
                                                                   "answers_match_bf16", "llm_weight_gib")
                                           if k in r)
        print(f"{r['variant']:<26}{vals}  {note}")


def run_bench(args: argparse.Namespace) -> int:
    """Build once, then: training variants, decode, evaluation, memory probe, and compiled variants last.

    Compiled variants go last because their compile time is the least predictable: if the run is cut off (or passes
    --budget-s), the other numbers are already printed.
    """
    device = resolve_device(args.device)
    args = _defaults(args, device)
    train_vs, gen_vs, eval_vs = split_variants(args, device)
    bench = Bench(args, device)
    bench.emit({"variant": "setup", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "llm": args.llm, "vision": args.vision, "qformer": args.qformer,
                "matmul_peak_tflops": bench.peak / 1e12, "tower_flops_per_image": bench.flops.tower})
    if train_vs:
        bench.attempt("objective-check", partial(objective_check, bench))
    for v in (v for v in train_vs if not parse_train_variant(v).compiled):
        bench.attempt(v, partial(train_variant, bench, v))
    if gen_vs:
        generate_section(bench, gen_vs)
    if eval_vs and args.suite == "model":
        eval_section(bench, eval_vs)
    elif eval_vs:
        suite_section(bench)
    if args.what == "serve":
        serve_section(bench)
    if args.what == "fp8-gate":
        fp8_gate(bench, [r.strip() for r in args.gate_recipes.split(",") if r.strip()])
    if args.probe_memory:
        for ckpt in (False, True):
            bench.attempt("memory-fast-ckpt" if ckpt else "memory-fast", partial(probe_memory, bench, ckpt))
    for v in (v for v in train_vs if parse_train_variant(v).compiled):
        bench.attempt(v, partial(train_variant, bench, v))
    print_table(bench.records[1:])
    return 0 if all("error" not in r for r in bench.records) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m minigpt4qwen.bench ...` without the package CLI (the same options as `minigpt4qwen bench`)."""
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="minigpt4qwen bench", description=(doc or "").split("\n\n")[0])
    add_bench_args(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return run_bench(p.parse_args(argv))
