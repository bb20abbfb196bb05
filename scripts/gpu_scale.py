"""Scaling benchmark of `minigpt4qwen train` itself on 1, 2 and 4 GPUs, for every engine.

    python scripts/gpu_scale.py --out /tmp/scale                        # stage 1, all engines, 1/2/4 GPUs
    python scripts/gpu_scale.py --gpus 4 --engines zero3,fsdp --set engine.frozen=shard    # one knob

Real-size architecture with random weights (EVA ViT-g + BLIP-2 Q-Former + Qwen-7B dims) and the production settings
of stage 1: projector only, bf16, cached image features, `train.compile=true`, length-grouped batches, batch 32 per
GPU. The data is the bench's length mix: text of 64-256 tokens per sample (uniform), the last ~30% of them the
supervised answer, plus 32 image positions, written as LLaVA JSON next to synthetic images.

Runs that fit side by side share the host: four 1-GPU runs at once on GPUs 0-3, two 2-GPU runs on 0-1 and 2-3,
so a full table takes about 3 x (one run). Prints one JSON line per (engine, GPUs): steady-state samples/s (last
half of the steps, from log.jsonl's elapsed_s), efficiency against the same engine on one GPU (rate / (n x rate_1))
and against DDP at the same size, and the peak memory per GPU; then a table.

Same data at every size (`--same-data`, the default): a run on k of the largest size's N GPUs accumulates N / k
micro-batches per optimizer step, so every run's step is the same global batch of the same samples (the sampler
groups lengths per global batch), and the timed steps cover the same rows. Without it a 1-GPU run's timed window
sees other, on this mix up to ~4% shorter, samples than the 4-GPU run's and the efficiency carries that (and
+-10% of window-to-window noise on a length mix): 2026-11-28's first table was made that way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ENGINES = {
    "ddp": ["engine.name=ddp"],
    "zero1": ["engine.name=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.name=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.name=deepspeed", "engine.zero_stage=3"],
    "fsdp": ["engine.name=fsdp"],
    # frozen weights partitioned too (what ZeRO-3 / FSDP2 did before engine.frozen; for models that do not fit)
    "zero3-shard": ["engine.name=deepspeed", "engine.zero_stage=3", "engine.frozen=shard"],
    "fsdp-shard": ["engine.name=fsdp", "engine.frozen=shard"],
}
WORDS = ("the a red blue green small large circle square triangle left right above below near picture shows "
         "one two three object color shape there is in of and with on what where how many").split()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_mix(out: Path, n: int, seq_min: int, seq_max: int, answer_frac: float, seed: int) -> Path:
    """LLaVA JSON whose rows tokenize (with the `random:` presets' tokenizer) to seq_min..seq_max text tokens."""
    from minigpt4qwen.data.synthetic import write_dataset
    from minigpt4qwen.models.llm import make_tiny_tokenizer

    if not (out / "train_seed.json").is_file():
        write_dataset(out, n_train=min(n, 512), n_heldout=4, seed=seed)
    images = sorted({r["image"] for r in json.loads((out / "train_seed.json").read_text())})
    tok = make_tiny_tokenizer()
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        words: list[str] = []
        while (have := len(tok.encode(" ".join(words), add_special_tokens=False))) < tokens:
            words.extend(rng.choice(WORDS) for _ in range(max(1, (tokens - have) // 4)))
        return " ".join(words)

    rows = []
    for i in range(n):
        total = rng.randint(seq_min, seq_max)
        answer = max(1, int(total * answer_frac))
        rows.append({"id": str(i), "image": rng.choice(images), "conversations": [
            {"from": "human", "value": "<image>\n" + text(total - answer)},
            {"from": "gpt", "value": text(answer)}]})
    path = out / "mix.json"
    path.write_text(json.dumps(rows))
    return path


def config_yaml(out: Path, data: Path, args) -> Path:
    path = out / "scale.yaml"
    path.write_text(f"""# python scripts/gpu_scale.py  (generated)
model: {{vision: eva-vit-g, qformer: blip2-qformer, llm: "random:qwen-7b"}}
data: {{train: [{{path: "{data}"}}], max_txt_len: {args.seq_max + 32}, random_resized_crop: false, hflip: false,
       cache_features: true, num_workers: 2}}
train: {{max_steps: {args.steps}, batch_size: {args.batch_size}, lr: 1.0e-4, warmup_steps: 0, precision: bf16,
        log_every: 10, save_every_steps: 0, save_every_epochs: 0, compile: {str(args.compile).lower()}}}
""")
    return path


def launch(name: str, engine: str, gpus: list[int], cfg: Path, out: Path, extra: list[str]) -> subprocess.Popen:
    run = out / name
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "4", "NCCL_NVLS_ENABLE": "0",
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={len(gpus)}", f"--master_port={_port()}",
           "-m", "minigpt4qwen", "train", "--config", str(cfg), f"train.output_dir={run}", *ENGINES[engine], *extra]
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


LOSS_TOLERANCE = 0.02  # same data, same seed: engines end within ~0.1% of DDP's loss in bf16 (4x H200, 2026-11-28)
STOPPED = -15  # the run was ended by --stop-after-saves (SIGTERM), not by a failure


def wait(proc: subprocess.Popen, run: Path, stop_after_saves: int, stop_at_step: int) -> int:
    """The launcher's exit status; SIGTERM once `stop_after_saves` checkpoints are complete or `stop_at_step` steps
    are logged (a speed or save-time bench needs no final checkpoint: a 7B full-LLM one is 118 GB and minutes of
    writing, and two 87 GB checkpoints plus the final one do not fit the 4-GPU host's disk)."""
    while proc.poll() is None:
        log, rows = run / "train.log", run / "log.jsonl"
        saves = log.read_text().count("complete after") if stop_after_saves and log.is_file() else 0
        steps = rows.read_text().count("\n") if stop_at_step and rows.is_file() else 0
        if (stop_after_saves and saves >= stop_after_saves) or (stop_at_step and steps >= stop_at_step):
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher and its workers
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return STOPPED
        time.sleep(2)
    return proc.returncode


def error_lines(text: str, n: int = 12) -> list[str]:
    """The first lines that say what failed (torchrun's own summary at the end names no cause)."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if re.search(r"(Error|error:|Exception|Traceback)", line)
            and "ChildFailedError" not in line and "elastic" not in line]
    return [lines[j] for i in hits[:3] for j in range(i, min(i + 4, len(lines)))][:n]


def measure(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()] \
        if (run / "log.jsonl").is_file() else []
    half = rows[len(rows) // 2:]
    rate = tok_rate = None
    if len(half) > 1:
        span = half[-1]["elapsed_s"] - half[0]["elapsed_s"]
        rate = sum(r["samples"] for r in half[1:]) / span
        tok_rate = sum(r.get("seq_tokens", 0) for r in half[1:]) / span
    saves = [float(m.group(1)) for m in re.finditer(r"training waited ([\d.]+) s", (run / "train.log").read_text())] \
        if (run / "train.log").is_file() else []
    return {"steps": len(rows), "samples_per_s": rate, "tokens_per_s": tok_rate,
            "peak_mem_gib": max((r.get("mem_gib", 0) for r in rows), default=None),
            "first_step_s": rows[0]["elapsed_s"] if rows else None,
            "step_s": [round(b["elapsed_s"] - a["elapsed_s"], 3) for a, b in zip(rows, rows[1:])],
            "losses": [round(r["loss"], 4) for r in rows[:3] + rows[-2:]],
            "final_loss": round(sum(r["loss"] for r in rows[-5:]) / len(rows[-5:]), 4) if rows else None,
            "save_wait_s": saves}


def mfu(tokens_per_s_per_gpu: float, recompute: bool, peak_tflops: float, frozen_base: bool = False) -> dict:
    """Model FLOPs of stage-2 training of the Qwen-7B-dims LLM per token, torchtitan's way: 6 x non-embedding
    parameters (lm_head counted) + 12 x layers x width x sequence for attention (sequence ~ the mix's mean).
    `frozen_base` (LoRA): 4 x parameters, as no weight gradient of the base is computed (forward 2N + the gradient
    of the activations 2N; the adapters' own FLOPs, well under 1% of N at the default rank 8, are left out);
    attention's term stays."""
    n_layers, width, vocab, inter, seq = 32, 4096, 151936, 11008, 1024
    per_layer = 4 * width * width + 3 * width * inter  # q, k, v, o + gate, up, down
    n = n_layers * per_layer + vocab * width
    flops = (4 if frozen_base else 6) * n + 12 * n_layers * width * seq
    hw = flops + (2 * n_layers * per_layer if recompute else 0)  # recompute: one more forward of the layers
    return {"mfu": round(tokens_per_s_per_gpu * flops / (peak_tflops * 1e12), 3),
            "hfu_with_recompute": round(tokens_per_s_per_gpu * hw / (peak_tflops * 1e12), 3),
            "flop_per_token": flops, "peak_tflops": peak_tflops, "flop_accounting": "4N (LoRA)" if frozen_base
            else "6N"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/minigpt4qwen-scale")
    p.add_argument("--gpus", default="1,2,4", help="process counts to measure")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="per GPU")
    p.add_argument("--samples", type=int, default=6000, help="rows in the length-mix data file")
    p.add_argument("--seq-min", type=int, default=64)
    p.add_argument("--seq-max", type=int, default=256)
    p.add_argument("--answer-frac", type=float, default=0.3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--set", action="append", default=[], help="extra dotted override for every run (repeat)")
    p.add_argument("--mfu", action="store_true", help="add MFU of full-LLM training (stage 2) to each line")
    p.add_argument("--recompute", action="store_true", help="with --mfu: runs use activation checkpointing")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="with --mfu: H100 SXM dense bf16 datasheet")
    p.add_argument("--tag", default="", help="suffix for run names and JSON lines (e.g. the knob measured)")
    p.add_argument("--stop-after-saves", type=int, default=0,
                   help="end each run once this many checkpoints are complete (save-time benches)")
    p.add_argument("--no-final-save", action="store_true", help="end each run after its last step is logged")
    p.add_argument("--budget-s", type=float, default=560, help="no new wave starts after this many seconds")
    p.add_argument("--first-gpu", type=int, default=0, help="use GPUs from this index on (two benches side by side)")
    p.add_argument("--same-data", action=argparse.BooleanOptionalAction, default=True,
                   help="smaller runs accumulate (largest size / GPUs) micro-batches: every step the same samples")
    p.add_argument("--profile-1gpu", default="", help="FIRST,COUNT: torch.profiler over those optimizer steps of the "
                   "1-GPU runs (keep it before the timed last half); each writes RUN/profile/ops.txt")
    args = p.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = write_mix(out / "data", args.samples, args.seq_min, args.seq_max, args.answer_frac, seed=0)
    cfg = config_yaml(out, data, args)
    t0 = time.time()  # the budget counts training runs, not writing the data
    n_dev = max(torch.cuda.device_count() - args.first_gpu, 0)
    engines = [e for e in args.engines.split(",") if e]
    results: dict[tuple[str, int], dict] = {}
    sizes = [int(x) for x in args.gpus.split(",")]
    largest = max([n for n in sizes if n <= n_dev] or [1])
    if args.same_data and any(x.startswith("train.grad_accum=") for x in args.set):
        sys.exit("--same-data sets train.grad_accum per run: leave it out of --set, or pass --no-same-data")

    def extra(k: int) -> list[str]:
        more = list(args.set)
        if args.same_data and largest % k == 0 and largest > k:
            more.append(f"train.grad_accum={largest // k}")
        if k == 1 and args.profile_1gpu:
            more.append(f"train.profile_steps=[{args.profile_1gpu}]")
        return more

    for n in sizes:
        if n > n_dev:
            print(json.dumps({"skipped": f"{n} GPUs", "reason": f"{n_dev} visible"}), flush=True)
            continue
        jobs = [(e, n) for e in engines if n > 1 or not e.endswith("-shard")]  # nothing to shard over on one GPU
        per_wave = max(n_dev // n, 1)
        for w in range(0, len(jobs), per_wave):
            if time.time() - t0 > args.budget_s:
                print(json.dumps({"skipped": [f"{e}x{k}" for e, k in jobs[w:]], "reason": "budget"}), flush=True)
                break
            wave = jobs[w:w + per_wave]
            procs = []
            for slot, (e, k) in enumerate(wave):
                name = f"{e}-{k}gpu{args.tag}"
                gpus = list(range(args.first_gpu + slot * k, args.first_gpu + (slot + 1) * k))
                procs.append((e, k, name, launch(name, e, gpus, cfg, out, extra(k))))
            started = time.time()
            for e, k, name, proc in procs:
                rc = wait(proc, out / name, args.stop_after_saves, args.steps if args.no_final_save else 0)
                rec = {"engine": e, "gpus": k, "tag": args.tag, "rc": rc, "wall_s": round(time.time() - started, 1),
                       **measure(out / name),
                       "overrides": extra(k), "compile": args.compile, "batch_per_gpu": args.batch_size,
                       "device": torch.cuda.get_device_name(0) if n_dev else "cpu",
                       "date": time.strftime("%Y-%m-%d")}
                if rc and rc != STOPPED:
                    rec["errors"] = error_lines((out / f"{name}.log").read_text())
                results[(e, k)] = rec
                print(json.dumps({"partial": True, **rec}), flush=True)
    print("# summary", flush=True)
    for (e, k), rec in results.items():
        one, ddp = results.get((e.removesuffix("-shard"), 1), {}), results.get(("ddp", k), {})
        r = rec["samples_per_s"]
        if args.mfu and rec.get("tokens_per_s"):
            rec.update(mfu(rec["tokens_per_s"] / k, args.recompute, args.peak_tflops,
                               frozen_base="model.trainable.llm=lora" in args.set))
            rec["tokens_per_s_per_gpu"] = round(rec["tokens_per_s"] / k)
        if r and one.get("samples_per_s"):
            rec["efficiency_vs_1gpu"] = round(r / (k * one["samples_per_s"]), 3)
        if rec.get("tokens_per_s") and one.get("tokens_per_s"):  # the same measure in tokens through the LLM
            rec["token_efficiency_vs_1gpu"] = round(rec["tokens_per_s"] / (k * one["tokens_per_s"]), 3)
        if r and ddp.get("samples_per_s"):
            rec["vs_ddp"] = round(r / ddp["samples_per_s"], 3)
        if rec.get("final_loss") and ddp.get("final_loss"):
            # the same samples in the same order (--same-data) and seed: every engine should end where DDP does,
            # within bf16 noise; an engine that trains faster by not training shows here
            rec["loss_vs_ddp"] = round(rec["final_loss"] / ddp["final_loss"] - 1, 4)
        print(json.dumps(rec), flush=True)
    print(f"\n{'engine':<11} {'GPUs':>4} {'samples/s':>10} {'eff vs 1':>9} {'vs DDP':>7} {'GiB/GPU':>8} {'loss':>7}"
          f" {'vs DDP':>7}")
    nan = float("nan")
    for (e, k), rec in results.items():
        sps = rec["samples_per_s"]
        print(f"{e:<11} {k:>4} {sps or nan:>10.1f} {rec.get('efficiency_vs_1gpu', nan):>9.3f} "
              f"{rec.get('vs_ddp', nan):>7.3f} {rec['peak_mem_gib'] or nan:>8.1f} {rec.get('final_loss') or nan:>7.3f}"
              f" {rec.get('loss_vs_ddp', nan):>+7.1%}")
    off = [f"{e} x{k} ({rec['loss_vs_ddp']:+.1%})" for (e, k), rec in results.items()
           if abs(rec.get("loss_vs_ddp") or 0) > LOSS_TOLERANCE]
    if off:  # its speed is not comparable: it does not compute what DDP computes
        print(f"\nWARNING: final loss differs from DDP's by more than {LOSS_TOLERANCE:.0%} (bf16 noise is well "
              f"below): {', '.join(off)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
