"""`minigpt4qwen bench`: training, decoding and batched-evaluation throughput at real size with random weights.

    minigpt4qwen bench all --probe-memory --out bench.jsonl     # one H100: EVA ViT-g + Q-Former + Qwen-7B dims
    minigpt4qwen bench train --variants seed-style,fast-cached  # a subset (names: see train.parse_train_variant)
    minigpt4qwen bench all --device cpu                         # tiny presets: proves it runs (CI), no timings
    minigpt4qwen bench eval --suite all --preset 7b             # `eval all` on official-size synthetic files
    minigpt4qwen bench fp8-gate --budget-s 1800                 # train.fp8 against bf16: final loss, greedy answers

The seed-style baseline and our paths run in one process on one model (built once, by the same `build_model` that
`train` uses) and on the same synthetic samples: text tokens per sample uniform in [--seq-min, --seq-max], 32 image
positions per image, labels only on a trailing answer span (--answer-frac of the text), fixed seed, batched by
`data.collate`. The package's training variants time `train.step.micro_step`, the function `train` runs for every
micro-batch. Every variant prints one JSON line (variant, samples_per_s, tokens_per_s, step_s, flops_per_sample, mfu
against a bf16 matmul peak measured in the same run, peak_mem_gib, ...); one that fails (OOM, compile error) prints
{"variant", "error"} and the run goes on. The FLOP formulas are in docs/BENCH_NOTES.md.

Modules: common (timing, samples, batches, the Bench object), flops, train, generate, eval, cli (options, the run).
"""

from .cli import add_bench_args, compiles, main, run_bench
from .common import RESULT_FIELDS
from .eval import EVAL_VARIANTS
from .generate import GENERATE_VARIANTS
from .train import DEFAULT_TRAIN, TrainMode, parse_train_variant

__all__ = ["DEFAULT_TRAIN", "EVAL_VARIANTS", "GENERATE_VARIANTS", "RESULT_FIELDS", "TrainMode", "add_bench_args",
           "compiles", "main", "parse_train_variant", "run_bench"]
