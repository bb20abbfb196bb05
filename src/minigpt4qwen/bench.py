"""`minigpt4qwen bench`: training, decoding and batched-evaluation throughput at real size with random weights.

    minigpt4qwen bench all --probe-memory --out bench.jsonl     # one H100: EVA ViT-g + Q-Former + Qwen-7B dims
    minigpt4qwen bench train --variants seed-style,fast-cached  # a subset (names: see parse_train_variant)
    minigpt4qwen bench all --device cpu                         # tiny presets: proves it runs (CI), no timings

The seed-style baseline and our paths run in one process on one model (built once, by the same `build_model` that
`train` uses) and on the same synthetic samples: text tokens per sample uniform in [--seq-min, --seq-max], 32 image
positions per image, labels only on a trailing answer span (--answer-frac of the text), fixed seed. Every variant
prints one JSON line (variant, samples_per_s, tokens_per_s, step_s, flops_per_sample, mfu against a bf16 matmul peak
measured in the same run, peak_mem_gib, ...); one that fails (OOM, compile error) prints {"variant", "error"} and the
run goes on. The FLOP formulas are in docs/BENCH_NOTES.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch

from .config import ModelConfig
from .data.conversation import IGNORE_INDEX
from .data.dataset import length_grouped
from .models.minigpt4qwen import MiniGPT4Qwen, build_model
from .serve.fastdecode import FastDecoder
from .train.engines import param_groups, resolve_device
from .train.step import autocast_ctx, to_device

log = logging.getLogger("minigpt4qwen.bench")

PRESETS = {"cuda": ("eva-vit-g", "blip2-qformer", "random:qwen-7b"), "cpu": ("tiny", "tiny", "random:tiny-qwen2")}
DEFAULT_TRAIN = ("seed-style", "fast-padmax-ckpt-padmask", "fast-ckpt-padmask", "fast-padmask", "fast",
                 "fast-cached", "fast-cached-compile", "fast-cached-scompile")
"""A ladder: each variant drops one lever of the one before (answer-only loss, length sorting, no recompute, no
padding mask, cached image features, compiled layers), so consecutive lines give each lever's worth at one batch size."""
GENERATE_VARIANTS = ("hf-generate", "fast-decode", "fast-decode-fused", "fast-decode-compile", "fast-decode-compile-fused")
"""Also accepted: fast-decode[-autotune][-fused] (inductor max-autotune; its kernel search takes minutes)."""
EVAL_VARIANTS = ("eval-hf-generate", "eval-fast-decode", "eval-fast-decode-fused")
RESULT_FIELDS = ("samples_per_s", "tokens_per_s", "step_s", "flops_per_sample", "mfu", "peak_mem_gib")
GIB = 2**30


# --------------------------------------------------------------------------------------------- CLI


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Options of `minigpt4qwen bench`; defaults marked 'cuda/cpu' differ so that CPU runs take seconds."""
    p.add_argument("what", nargs="?", default="all", choices=("train", "generate", "eval", "all"))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--vision", help="vision preset (default eva-vit-g on CUDA, tiny on CPU)")
    p.add_argument("--qformer", help="Q-Former preset (default blip2-qformer on CUDA, tiny on CPU)")
    p.add_argument("--llm", help="LLM (default random:qwen-7b on CUDA, random:tiny-qwen2 on CPU)")
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
    p.add_argument("--eval-questions", type=int, help="yes/no questions (cuda 2374 = MME / cpu 24)")
    p.add_argument("--eval-batch", type=int, help="questions per generate call (cuda 128 / cpu 8)")
    p.add_argument("--eval-new-tokens", type=int, default=3)
    p.add_argument("--probe-memory", action="store_true", help="largest micro-batch of `fast`, with/without ckpt")
    p.add_argument("--probe-max", type=int, help="largest batch the probe tries (cuda 4096 / cpu 16)")
    p.add_argument("--budget-s", type=float, default=400.0, help="variants not started by then are reported skipped")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 2 steps of each training variant: GPU time by kernel class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also append the JSON lines to this file")


def _defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the device-dependent defaults (real size on CUDA, tiny and short on CPU)."""
    cuda = device.type == "cuda"
    table = {"batch_size": (32, 4), "steps": (10, 2), "warmup": (-1, 1), "gen_tokens": (128, 8), "gen_repeats": (2, 1),
             "eval_questions": (2374, 24), "eval_batch": (128, 8), "probe_max": (4096, 16)}
    filled = {k: v[0 if cuda else 1] for k, v in table.items() if getattr(args, k, None) is None}
    vision, qformer, llm = PRESETS["cuda" if cuda else "cpu"]
    filled.update({k: v for k, v in (("vision", vision), ("qformer", qformer), ("llm", llm))
                   if getattr(args, k, None) is None})
    args = argparse.Namespace(**{**vars(args), **filled})
    if args.steps < 1 or args.warmup < -1 or not 0 < args.seq_min <= args.seq_max:
        raise ValueError("need --steps >= 1, --warmup >= 0 (-1: one pass over the batches) and "
                         "0 < --seq-min <= --seq-max")
    return args


# --------------------------------------------------------------------------------------------- synthetic data


@dataclass
class Sample:
    ids: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    @property
    def supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def make_samples(n: int, seed: int, vocab: int, image_token_id: int, n_query: int, seq_min: int, seq_max: int,
                 answer_frac: float) -> list[Sample]:
    """Tokenizer-free prompts: a few text tokens, one image's placeholder run, more text; labels on a trailing span.

    Random ids stand in for text (throughput does not depend on which ids); the placeholder id is the real one so
    `model.embed` swaps in image features exactly as in training.
    """
    g = torch.Generator().manual_seed(seed)
    lo = 16 if vocab > 64 else 0
    out = []
    for _ in range(n):
        n_text = int(torch.randint(seq_min, seq_max + 1, (1,), generator=g))
        text = torch.randint(lo, vocab, (n_text,), generator=g)
        text = torch.where(text == image_token_id, (text + 1) % vocab, text)
        lead = min(8, n_text)
        ids = torch.cat([text[:lead], torch.full((n_query,), image_token_id), text[lead:]])
        labels = torch.full_like(ids, IGNORE_INDEX)
        n_answer = min(n_text - lead, max(1, round(answer_frac * n_text))) if answer_frac > 0 else 0
        if n_answer:
            labels[-n_answer:] = ids[-n_answer:]
        out.append(Sample(ids, labels))
    return out


def pad_batch(samples: list[Sample], pad_id: int, length: int | None = None, left: bool = False) -> dict:
    """input_ids / attention_mask / labels padded to `length` (default: the batch's longest); left for generation."""
    length = length or max(s.tokens for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        cols = slice(length - s.tokens, length) if left else slice(0, s.tokens)
        ids[i, cols], mask[i, cols], labels[i, cols] = s.ids, 1, s.labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_order(lengths: list[int], batch_size: int, by_length: bool, seed: int) -> list[list[int]]:
    """Index batches: in sample order, or length-grouped by `train`'s own sampler function with one window over the
    whole pool (a global sort, then the batch order shuffled, the longest batch first)."""
    idx = list(range(len(lengths)))
    if by_length:
        idx = length_grouped(idx, lengths, batch_size, window=len(idx) // batch_size + 1, seed=seed)
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def random_images(n: int, size: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, device=device).to(dtype)


# --------------------------------------------------------------------------------------------- FLOPs


@dataclass
class FlopModel:
    """Useful FLOPs: real (unpadded) tokens only, no recompute, matmuls only (see docs/BENCH_NOTES.md)."""

    dense: int
    """Weights of the Linear layers inside the LLM decoder layers."""
    head: int
    """lm_head weights (vocab x width)."""
    layers: int
    attn_width: int
    """Query heads x head_dim."""
    tower: float
    """Forward FLOPs of ViT + Q-Former + projector for one image (counted by torch's FlopCounterMode)."""

    @classmethod
    def of(cls, model: MiniGPT4Qwen, image: torch.Tensor) -> FlopModel:
        from torch.utils.flop_counter import FlopCounterMode

        cfg = model.llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dense = sum(m.weight.numel() for m in model.decoder().layers.modules() if isinstance(m, torch.nn.Linear))
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.project(model.qformer_features(image))
        return cls(dense, model.llm.get_output_embeddings().weight.numel(), cfg.num_hidden_layers,
                   cfg.num_attention_heads * head_dim, float(counter.get_total_flops()))

    def train(self, tokens: int, supervised: int, vision: bool) -> float:
        """Forward + input-gradient backward through the frozen LLM (+ the frozen towers' forward when not cached).

        Frozen Linear: forward 2NT, backward only dX = another 2NT (no weight gradient). Causal attention: forward
        2*L*T^2*width (QK^T and AV, half the square), backward 2x forward (dQ, dK, dV, dP).
        """
        linear = 4 * self.dense * tokens + 4 * self.head * supervised
        attention = 6 * self.layers * tokens**2 * self.attn_width
        return float(linear + attention) + (self.tower if vision else 0.0)

    def generate(self, prompt: int, new_tokens: int, vision: bool = False) -> float:
        """Prefill (lm_head on the last position only) + one forward per new token over its growing context."""
        prefill = 2 * self.dense * prompt + 2 * self.head + 2 * self.layers * prompt**2 * self.attn_width
        decode = sum(2 * (self.dense + self.head) + 4 * self.layers * (prompt + i) * self.attn_width
                     for i in range(1, new_tokens))
        return float(prefill + decode) + (self.tower if vision else 0.0)


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of one large matmul (bf16 8192^3 on CUDA, fp32 512^3 on CPU): the MFU denominator of this run."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 50) if cuda else (512, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    t = _timer(device)
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / t()


# --------------------------------------------------------------------------------------------- the run's state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device: torch.device) -> Callable[[], float]:
    """Start a wall clock after the device is idle; calling the result syncs and returns the seconds since."""
    _sync(device)
    t0 = time.perf_counter()

    def stop() -> float:
        _sync(device)
        return time.perf_counter() - t0

    return stop


class Bench:
    """The model, the measured peak and the records of one `bench` run."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.precision = "bf16" if device.type == "cuda" else "fp32"
        self.t0 = time.perf_counter()
        cfg = ModelConfig(vision=args.vision, qformer=args.qformer, llm=args.llm,
                          num_query_tokens=args.num_query_tokens, attn_implementation=args.attn_implementation)
        torch.manual_seed(args.seed)
        with torch.device(device):  # random init directly on the GPU: seconds instead of minutes on the host
            built = build_model(cfg, device)
        self.model: MiniGPT4Qwen = built.model
        tok = built.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.pad_id
        self.vocab = self.model.llm.config.vocab_size
        self.image_size = self.model.vision_model.config.image_size
        self.image_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        self.flops = FlopModel.of(self.model, self.images(1, seed=args.seed))
        self.peak = matmul_peak(device)
        log.info("built in %.1f s; matmul peak %.1f TFLOP/s; tower %.3g FLOP/image",
                 time.perf_counter() - self.t0, self.peak / 1e12, self.flops.tower)
        self.records: list[dict] = []

    def samples(self, n: int, seed: int, seq_min: int | None = None, seq_max: int | None = None,
                answer_frac: float | None = None) -> list[Sample]:
        a = self.args
        return make_samples(n, seed, self.vocab, self.model.image_token_id, self.model.num_query_tokens,
                            a.seq_min if seq_min is None else seq_min, a.seq_max if seq_max is None else seq_max,
                            a.answer_frac if answer_frac is None else answer_frac)

    def images(self, n: int, seed: int) -> torch.Tensor:
        return random_images(n, self.image_size, self.image_dtype, self.device, seed)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mem_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark (KiB -> GiB)

    def result(self, samples: int, tokens: int, steps: int, seconds: float, flops: float) -> dict:
        """The common JSON fields from what a variant did in `seconds`."""
        return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "step_s": seconds / steps,
                "flops_per_sample": flops / samples, "mfu": flops / seconds / self.peak,
                "peak_mem_gib": self.peak_mem_gib()}

    def attempt(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run one variant; a failure (OOM, compile error) becomes an error record and the run continues."""
        if time.perf_counter() - self.t0 > self.args.budget_s:
            rec = {"variant": name, "error": f"skipped: past --budget-s {self.args.budget_s:.0f}"}
        else:
            log.info("variant %s", name)
            try:
                rec = {"variant": name, **fn()}
            except Exception as exc:  # one variant's failure must not cost the other numbers
                log.exception("variant %s failed", name)
                rec = {"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        self.model.zero_grad(set_to_none=True)
        release(self.device)
        self.emit(rec)
        return rec

    def emit(self, rec: dict) -> None:
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}
        self.records.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        if self.args.out:
            with open(self.args.out, "a") as f:
                f.write(line + "\n")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc) or "ALLOC_FAILED" in str(exc)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainMode:
    """What a training variant does; see parse_train_variant for the names."""

    pad_max: bool = False
    hf_loss: bool = False
    ckpt: bool = False
    cached: bool = False
    compile: bool = False
    static_compile: bool = False
    pad_mask: bool = False
    batch_size: int | None = None

    @property
    def compiled(self) -> bool:
        return self.compile or self.static_compile


def parse_train_variant(name: str) -> TrainMode:
    """`seed-style`, or `fast` plus any of -padmax -hfloss -ckpt -padmask -cached -compile -scompile -bN.

    seed-style = fast-padmax-hfloss-ckpt-padmask: padded to seq-max + image positions, full-vocabulary logits and
    HF's loss, LLM activation checkpointing, a padding mask, vision every step. `fast` is the package's training
    forward as `train` runs it. -padmask keeps the padding mask (masked SDPA kernel) where `fast` drops it for
    right-padded batches; -compile = `layer.compile(dynamic=True)` per decoder layer; -scompile = static shapes
    (dynamic=False, batches padded to a multiple of 64, every shape compiled during warm-up).
    """
    if name == "seed-style":
        return TrainMode(pad_max=True, hf_loss=True, ckpt=True, pad_mask=True)
    head, *tokens = name.split("-")
    if head != "fast":
        raise ValueError(f"unknown training variant {name!r}: use seed-style or fast[-padmax|-hfloss|-ckpt|...]")
    flags = {"padmax": "pad_max", "hfloss": "hf_loss", "ckpt": "ckpt", "cached": "cached", "compile": "compile",
             "scompile": "static_compile", "padmask": "pad_mask"}
    mode = TrainMode()
    for t in tokens:
        if t in flags:
            mode = replace(mode, **{flags[t]: True})
        elif t[:1] == "b" and t[1:].isdigit():
            mode = replace(mode, batch_size=int(t[1:]))
        else:
            raise ValueError(f"unknown part {t!r} in training variant {name!r}")
    return mode


def batch_loss(model: MiniGPT4Qwen, batch: dict, hf_loss: bool, pad_mask: bool = False) -> torch.Tensor:
    """Mean loss per supervised token: HF's full-vocabulary path (the seed's) or the package's training forward,
    which (as `train` does for its right-padded batches) runs without the padding mask unless `pad_mask`."""
    images = {"features": batch["features"]} if "features" in batch else {"pixel_values": batch.get("pixel_values")}
    if hf_loss:
        embeds = model.inputs_embeds(batch["input_ids"], **images)
        return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    total, n = model(batch["input_ids"], batch["attention_mask"] if pad_mask else None, batch["labels"], **images)
    return total / n


@contextmanager
def train_setup(model: MiniGPT4Qwen, mode: TrainMode) -> Iterator[None]:
    """Checkpointing / compiled layers for one variant, undone afterwards so the next variant starts clean.

    Checkpointing goes on before `model.train()`: HF recomputes a layer only in training mode, and MiniGPT4Qwen.train()
    keeps a frozen tower in train mode exactly when it is checkpointed (its dropout is 0, nothing else changes).
    """
    if mode.ckpt:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if mode.compiled:
        model.compile_decoder_layers(dynamic=not mode.static_compile)
    try:
        yield
    finally:
        if mode.ckpt:
            model.llm.gradient_checkpointing_disable()
        model.uncompile_decoder_layers()
        model.eval()


def device_batches(bench: Bench, samples: list[Sample], order: list[list[int]], images: torch.Tensor,
                   features: torch.Tensor | None, pad_to: int | None, multiple: int = 1) -> list[dict]:
    """Batches on the device before timing: collation overlaps the GPU in a DataLoader, so it is not measured."""
    out = []
    for idx in order:
        length = pad_to or -(-max(samples[i].tokens for i in idx) // multiple) * multiple
        b = to_device(pad_batch([samples[i] for i in idx], bench.pad_id, length), bench.device)
        b["pixel_values"] = images[idx]
        if features is not None:
            b["features"] = features[idx]
        b["tokens"] = sum(samples[i].tokens for i in idx)
        b["flops"] = sum(bench.flops.train(samples[i].tokens, samples[i].supervised, features is None) for i in idx)
        out.append(b)
    return out


def cached_features(model: MiniGPT4Qwen, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Q-Former outputs of every image, once: what training without augmentation can reuse every epoch."""
    with torch.inference_mode():
        return torch.cat([model.qformer_features(images[i : i + chunk]) for i in range(0, len(images), chunk)])


def train_variant(bench: Bench, name: str) -> dict:
    a, model = bench.args, bench.model
    mode = parse_train_variant(name)
    bs = mode.batch_size or a.batch_size
    n = bs * a.steps
    samples = bench.samples(n, a.seed)
    images = bench.images(n, a.seed)
    extra: dict = {"batch_size": bs}
    features = None
    if mode.cached:
        timer = _timer(bench.device)
        features = cached_features(model, images).clone()
        extra["cache_s"] = timer()
    order = batch_order([s.tokens for s in samples], bs, by_length=not mode.pad_max, seed=a.seed)
    pad_to = a.seq_max + model.num_query_tokens if mode.pad_max else None
    batches = device_batches(bench, samples, order, images, features, pad_to, 64 if mode.static_compile else 1)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5)
    bench.reset_peak()
    # warm-up re-runs the first batches, so every variant times exactly the same samples; static shapes compile
    # once per distinct length, so their warm-up covers every batch
    warmup = len(batches) if mode.static_compile or a.warmup < 0 else a.warmup
    schedule = [batches[i % len(batches)] for i in range(warmup)] + batches

    def step(b: dict) -> torch.Tensor:
        with autocast_ctx(bench.device, bench.precision):
            loss = batch_loss(model, b, mode.hf_loss, mode.pad_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    with train_setup(model, mode):
        timer = _timer(bench.device)
        for i, b in enumerate(schedule):
            if i == warmup:
                extra["warmup_s"] = timer()
                timer = _timer(bench.device)
            loss = step(b)
        seconds = timer()
        if a.profile and bench.device.type == "cuda":
            extra.update(profile_steps(lambda: [step(b) for b in batches[:2]], 2))
    padded = sum(b["input_ids"].numel() for b in batches)
    tokens = sum(b["tokens"] for b in batches)
    extra.update(loss=float(loss.detach()), padding_frac=1 - tokens / padded)
    return {**bench.result(n, tokens, len(batches), seconds, sum(b["flops"] for b in batches)), **extra}


KERNEL_CLASSES = (("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "splitk")),
                  ("attention", ("flash", "fmha", "attention", "attn")),
                  ("copy", ("memcpy", "memset", "copy", "cat")))


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "elementwise/other")


def profile_steps(fn: Callable[[], object], steps: int) -> dict:
    """GPU kernel time per step by class (gemm / attention / copy / other) and the 8 largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    classes: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        ms = getattr(e, "self_device_time_total", 0.0) / 1e3 / steps
        if ms <= 0:
            continue
        c = kernel_class(e.key)
        classes[c] = classes.get(c, 0.0) + ms
        kernels.append((ms, e.key))
    top = [[name[:90], round(ms, 2)] for ms, name in sorted(kernels, reverse=True)[:8]]
    return {"kernel_ms": {k: round(v, 2) for k, v in sorted(classes.items())},
            "kernel_ms_total": round(sum(classes.values()), 2), "top_kernels": top}


def objective_check(bench: Bench) -> dict:
    """Seed-style and fast loss on the same samples (padded to seq-max vs to the batch max): the same objective."""
    a, model = bench.args, bench.model
    samples = bench.samples(a.batch_size, a.seed)
    images = bench.images(len(samples), a.seed)
    order = [list(range(len(samples)))]
    padded = device_batches(bench, samples, order, images, None, a.seq_max + model.num_query_tokens)[0]
    tight = device_batches(bench, samples, order, images, None, None)[0]
    model.eval()
    with torch.no_grad(), autocast_ctx(bench.device, bench.precision):
        seed_loss = float(batch_loss(model, padded, hf_loss=True))
        fast_loss = float(batch_loss(model, tight, hf_loss=False))
    return {"seed_style_loss": seed_loss, "fast_loss": fast_loss, "abs_diff": abs(seed_loss - fast_loss)}


def probe_memory(bench: Bench, ckpt: bool) -> dict:
    """Largest `fast` micro-batch that trains a step: doubling from 8 until OOM, then two bisection steps.

    Batches are padded to the longest sample of the mix (seq-max + image positions): the size found then fits every
    batch of the mix, whatever the length grouping puts together.
    """
    a, model = bench.args, bench.model
    longest = a.seq_max + model.num_query_tokens
    mode = TrainMode(ckpt=ckpt)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5)

    def fits(bs: int) -> float | None:
        """Peak GiB of one training step at batch `bs`, None on OOM."""
        bench.reset_peak()
        ok = False
        try:
            samples = bench.samples(bs, a.seed + bs)
            b = device_batches(bench, samples, [list(range(bs))], bench.images(bs, a.seed), None, longest)[0]
            with train_setup(model, mode):
                with autocast_ctx(bench.device, bench.precision):
                    loss = batch_loss(model, b, hf_loss=False)
                loss.backward()
                optimizer.step()
            _sync(bench.device)
            ok = True
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to get workspace
            if not is_oom(exc):
                raise
        b = loss = None
        optimizer.zero_grad(set_to_none=True)
        peak = bench.peak_mem_gib()
        release(bench.device)
        log.info("probe ckpt=%s batch %d: %s", ckpt, bs, f"{peak:.1f} GiB" if ok else "OOM")
        return peak if ok else None

    tried: dict[int, float | None] = {}
    best, oom, bs = 0, None, 8
    while bs <= a.probe_max:
        tried[bs] = fits(bs)
        if tried[bs] is None:
            oom = bs
            break
        best, bs = bs, bs * 2
    for _ in range(2 if oom and best else 0):
        mid = (best + oom) // 2
        if mid in (best, oom):
            break
        tried[mid] = fits(mid)
        best, oom = (mid, oom) if tried[mid] is not None else (best, mid)
    if not best:
        raise RuntimeError(f"batch 8 does not fit (ckpt={ckpt})")
    return {"max_batch": best, "first_oom": oom, "peak_mem_gib": tried[best], "probe_max": a.probe_max,
            "tried": {str(k): (None if v is None else round(v, 2)) for k, v in sorted(tried.items())}}


# --------------------------------------------------------------------------------------------- generation


def answer_ids(row: torch.Tensor, eos: list[int]) -> list[int]:
    """A generated row up to and including its first stop id (the rest is padding)."""
    ids = row.tolist()
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def hf_generate(model: MiniGPT4Qwen, embeds: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: list[int],
                pad_id: int, force_length: bool = False) -> torch.Tensor:
    """The baseline: HF generate from embeddings, greedy (serve/generate.py still uses it for sampling and beams)."""
    extra = {"min_new_tokens": new_tokens} if force_length else {}
    return model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=eos or None, pad_token_id=pad_id, **extra)


def generate_section(bench: Bench, variants: list[str]) -> None:
    """Batch-1 decode of --gen-tokens new tokens after a --gen-prompt text + one image prompt."""
    a, model = bench.args, bench.model
    model.eval()
    sample = bench.samples(1, a.seed + 1, a.gen_prompt, a.gen_prompt, 0.0)[0]
    with torch.inference_mode():
        embeds = model.inputs_embeds(sample.ids[None].to(bench.device), pixel_values=bench.images(1, a.seed + 1))
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=bench.device)
    n, prompt = a.gen_tokens, embeds.shape[1]
    reference: list[torch.Tensor] = []

    def run(name: str) -> dict:
        if name == "hf-generate":
            def decode(k: int) -> torch.Tensor:
                with torch.inference_mode():
                    return hf_generate(model, embeds, mask, k, [], bench.pad_id, force_length=True)
        else:
            parts = set(name.split("-")[2:])
            compile_ = "max-autotune-no-cudagraphs" if "autotune" in parts else "compile" in parts
            decoder = FastDecoder(model.llm, max_batch=1, max_len=prompt + n, fuse="fused" in parts,
                                  compile=compile_)

            def decode(k: int) -> torch.Tensor:
                return decoder.generate(embeds, mask, k)
        bench.reset_peak()
        decode(min(n, 8) if name == "hf-generate" else n)  # warm-up (and the CUDA graph capture)
        timer = _timer(bench.device)
        for _ in range(a.gen_repeats):
            tokens = decode(n)
        seconds = timer()
        extra = {"new_tokens": n, "prompt_tokens": prompt}
        if name == "hf-generate":
            reference.append(tokens)
        elif reference:  # share of positions where the greedy tokens agree (bf16 near-ties may flip a few)
            k = min(tokens.shape[1], reference[0].shape[1])
            extra["match_hf"] = float((tokens[:, :k] == reference[0][:, :k]).float().mean())
        runs = a.gen_repeats
        return {**bench.result(runs, n * runs, n * runs, seconds, runs * bench.flops.generate(prompt, n)), **extra}

    for name in variants:
        bench.attempt(name, partial(run, name))


def eval_section(bench: Bench, variants: list[str]) -> None:
    """--eval-questions short-answer prompts (~60 text tokens + one image), large batches, vision included."""
    a, model = bench.args, bench.model
    model.eval()
    prompts = bench.samples(a.eval_questions, a.seed + 2, 50, 70, 0.0)
    order = sorted(range(len(prompts)), key=lambda i: -prompts[i].tokens)  # similar lengths share a prefill
    batches = [order[i : i + a.eval_batch] for i in range(0, len(order), a.eval_batch)]
    padded = [{k: v.to(bench.device) for k, v in pad_batch([prompts[i] for i in idx], bench.pad_id, left=True).items()}
              for idx in batches]
    eos = [bench.eos_id]  # a stop id as evaluation passes one; random weights rarely emit it
    new = a.eval_new_tokens
    max_len = max(p.tokens for p in prompts) + new
    reference: list[list[int]] = []

    def run(name: str) -> dict:
        decoder = None
        if name != "eval-hf-generate":
            decoder = FastDecoder(model.llm, a.eval_batch, max_len, fuse=name.endswith("-fused"))

        def answer(i: int) -> torch.Tensor:
            with torch.inference_mode():
                images = bench.images(len(batches[i]), a.seed + 1000 + i)
                embeds = model.inputs_embeds(padded[i]["input_ids"], features=model.qformer_features(images))
                mask = padded[i]["attention_mask"]
                if decoder is None:
                    return hf_generate(model, embeds, mask, new, eos, bench.pad_id).cpu()
                return decoder.generate(embeds, mask, new, eos, bench.pad_id).cpu()

        bench.reset_peak()
        answer(0)  # warm-up; the last batch is smaller: its CUDA graph is captured here too, not while timed
        answer(len(batches) - 1)
        timer = _timer(bench.device)
        rows = [answer_ids(r, eos) for i in range(len(batches)) for r in answer(i)]
        seconds = timer()
        generated = sum(len(r) for r in rows)
        flops = sum(bench.flops.generate(p.tokens, new, vision=True) for p in prompts)
        extra = {"questions": len(prompts), "batch_size": a.eval_batch, "total_s": seconds,
                 "questions_per_s": len(prompts) / seconds}
        if decoder is None:
            reference.extend(rows)
        elif reference:
            extra["match_hf"] = sum(x == y for x, y in zip(rows, reference, strict=True)) / len(rows)
        return {**bench.result(len(prompts), generated, len(batches), seconds, flops), **extra}

    for name in variants:
        bench.attempt(name, partial(run, name))


# --------------------------------------------------------------------------------------------- the command


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
    chosen = ("train", "generate", "eval") if args.what == "all" else (args.what,)
    return tuple(sections[k] if k in chosen else [] for k in ("train", "generate", "eval"))  # type: ignore[return-value]


def print_table(records: list[dict]) -> None:
    cols = ("samples_per_s", "tokens_per_s", "step_s", "mfu", "peak_mem_gib")
    print(f"{'variant':<26}" + "".join(f"{c:>15}" for c in cols) + "  note")
    for r in records:
        vals = "".join(f"{r[c]:>15.4g}" if isinstance(r.get(c), float) else f"{'-':>15}" for c in cols)
        note = r.get("error") or ", ".join(f"{k}={r[k]}" for k in ("batch_size", "max_batch", "match_hf", "abs_diff",
                                                                   "total_s") if k in r)
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
    if eval_vs:
        eval_section(bench, eval_vs)
    if args.probe_memory:
        for ckpt in (False, True):
            bench.attempt("memory-fast-ckpt" if ckpt else "memory-fast", partial(probe_memory, bench, ckpt))
    for v in (v for v in train_vs if parse_train_variant(v).compiled):
        bench.attempt(v, partial(train_variant, bench, v))
    print_table(bench.records[1:])
    return 0 if all("error" not in r for r in bench.records) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m minigpt4qwen.bench ...` without the package CLI (the same options as `minigpt4qwen bench`)."""
    p = argparse.ArgumentParser(prog="minigpt4qwen bench", description=__doc__.split("\n\n")[0])
    add_bench_args(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
