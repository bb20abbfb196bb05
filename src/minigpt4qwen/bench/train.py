"""`bench train`: training variants, the objective check and the memory probe.

Every variant of the package's path runs `train.step.micro_step`, the function `train`'s loop calls for each
micro-batch, on `collate` batches, with the loss scaled by 1 / the batch's supervised tokens (what the loop does in
one process), then an AdamW step. Only the variants that time the seed's own forward (`seed-style`, `-hfloss`,
`-padmask`) run `seed_micro_step` instead; batches, padding, timing and the optimizer step are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch

from ..models.minigpt4qwen import MiniGPT4Qwen
from ..train import step as train_step  # micro_step looked up on the module: the loop's function, patchable
from ..train.engines import param_groups
from ..train.fp8 import convert_fp8, require_fp8_device, revert_fp8
from ..train.liger import apply_liger, require_liger
from ..train.step import autocast_ctx, supervised_tokens, to_device
from .common import Bench, Sample, batch_order, collate_samples, is_oom, log, release, sync, timer
from .generate import answer_ids, hf_generate

DEFAULT_TRAIN = ("seed-style", "fast-padmax-ckpt-padmask", "fast-ckpt-padmask", "fast-padmask", "fast",
                 "fast-cached", "fast-cached-compile", "fast-cached-scompile")
"""A ladder: each variant drops one lever of the one before (answer-only loss, length sorting, no recompute, no
padding mask, cached image features, compiled layers), so consecutive lines give each lever's worth at one batch size."""


@dataclass(frozen=True)
class TrainMode:
    """What a training variant does; see parse_train_variant for the names."""

    pad_max: bool = False
    hf_loss: bool = False
    ckpt: bool = False
    cached: bool = False
    compile: bool = False
    static_compile: bool = False
    vision_compile: bool = False
    pad_mask: bool = False
    batch_size: int | None = None
    fp8: str = "off"
    fp8_once: bool = False
    liger: bool = False

    @property
    def compiled(self) -> bool:
        return self.compile or self.static_compile

    @property
    def seed_forward(self) -> bool:
        """Times the seed's forward (HF loss or a kept padding mask), not `train`'s micro_step."""
        return self.hf_loss or self.pad_mask


def parse_train_variant(name: str) -> TrainMode:
    """`seed-style`, or `fast` plus any of -padmax -hfloss -ckpt -padmask -cached -compile -scompile -bN
    -fp8-tensorwise -fp8-rowwise -once -liger.

    seed-style = fast-padmax-hfloss-ckpt-padmask: padded to seq-max + image positions, full-vocabulary logits and
    HF's loss, LLM activation checkpointing, a padding mask, vision every step. `fast` is `train`'s micro_step.
    -padmask keeps the padding mask (masked SDPA kernel) where micro_step drops it for right-padded batches;
    -compile = `layer.compile(dynamic=True)` per decoder layer; -scompile = static shapes (dynamic=False, batches
    padded to a multiple of 64, every shape compiled during warm-up). -fp8-<recipe> = `train.fp8` (CUDA >= 8.9),
    -once = `train.fp8_frozen=once`, -liger = `train.liger` (CUDA, liger-kernel installed), -vcompile = the frozen
    vision tower's blocks compiled too (`compile_vision_layers`; with -cached it has nothing to do).
    """
    if name == "seed-style":
        return TrainMode(pad_max=True, hf_loss=True, ckpt=True, pad_mask=True)
    head, *tokens = name.split("-")
    if head != "fast":
        raise ValueError(f"unknown training variant {name!r}: use seed-style or fast[-padmax|-hfloss|-ckpt|...]")
    flags = {"padmax": "pad_max", "hfloss": "hf_loss", "ckpt": "ckpt", "cached": "cached", "compile": "compile",
             "scompile": "static_compile", "vcompile": "vision_compile", "padmask": "pad_mask", "once": "fp8_once",
             "liger": "liger"}
    mode = TrainMode()
    rest = iter(tokens)
    for t in rest:
        if t in flags:
            mode = replace(mode, **{flags[t]: True})
        elif t == "fp8":
            recipe = next(rest, "")
            if recipe not in ("tensorwise", "rowwise"):
                raise ValueError(f"training variant {name!r}: -fp8 takes -tensorwise or -rowwise after it")
            mode = replace(mode, fp8=recipe)
        elif t[:1] == "b" and t[1:].isdigit():
            mode = replace(mode, batch_size=int(t[1:]))
        else:
            raise ValueError(f"unknown part {t!r} in training variant {name!r}")
    if mode.fp8_once and mode.fp8 == "off":
        raise ValueError(f"training variant {name!r}: -once needs -fp8-tensorwise or -fp8-rowwise")
    return mode


# --------------------------------------------------------------------------------------------- one step


def seed_micro_step(model: MiniGPT4Qwen, batch: dict, device: torch.device, precision: str, scale: float,
                    backward: Callable[[torch.Tensor], None], hf_loss: bool) -> torch.Tensor:
    """The seed's forward, kept only to time what the package replaced: the padding mask is always passed, and with
    `hf_loss` HF computes full-vocabulary logits and its mean loss. Otherwise micro_step's contract: a `collate`
    batch in, `backward(loss sum * scale)`, the detached loss sum out."""
    b = to_device(batch, device)
    with autocast_ctx(device, precision):
        if hf_loss:
            embeds = model.inputs_embeds(b["input_ids"], b["pixel_values"], b["features"])
            mean = model.llm(inputs_embeds=embeds, attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss = mean * supervised_tokens(batch)
        else:
            loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["features"])
    backward(loss * scale)
    return loss.detach()


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def optimizer_step(bench: Bench, mode: TrainMode, optimizer: torch.optim.Optimizer) -> Callable[[dict], torch.Tensor]:
    """One training step on one micro-batch as `train` runs it in one process (forward + backward with the loss
    scaled by 1 / the batch's supervised tokens, then the optimizer); returns the detached loss sum."""
    forward_backward = partial(seed_micro_step, hf_loss=mode.hf_loss) if mode.seed_forward else train_step.micro_step

    def step(batch: dict) -> torch.Tensor:
        loss = forward_backward(bench.model, batch, bench.device, bench.precision, 1 / supervised_tokens(batch),
                                _backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


@contextmanager
def train_setup(model: MiniGPT4Qwen, mode: TrainMode) -> Iterator[None]:
    """Checkpointing / fp8 / Liger / compiled layers for one variant, in `train`'s order, undone afterwards so the
    next variant starts clean.

    Checkpointing goes on before `model.train()`: HF recomputes a layer only in training mode, and MiniGPT4Qwen.train()
    keeps a frozen tower in train mode exactly when it is checkpointed (its dropout is 0, nothing else changes).
    """
    if mode.fp8 != "off":
        require_fp8_device(model.device, f"variant -fp8-{mode.fp8}")
    if mode.liger:
        require_liger(model.device)
    undo_liger = None
    try:
        if mode.ckpt:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if mode.fp8 != "off":
            convert_fp8(model, mode.fp8, "once" if mode.fp8_once else "recast")
        if mode.liger:
            undo_liger = apply_liger(model, layer_kernels=not mode.compiled)
        if mode.compiled:
            model.compile_decoder_layers(dynamic=not mode.static_compile)
        if mode.vision_compile:
            model.compile_vision_layers()
        yield
    finally:
        if mode.ckpt:
            model.llm.gradient_checkpointing_disable()
        model.uncompile_layers()
        if undo_liger is not None:
            undo_liger()
        if mode.fp8 != "off":
            revert_fp8(model)
        model.eval()


def train_batches(bench: Bench, samples: list[Sample], order: list[list[int]], images: torch.Tensor,
                  features: torch.Tensor | None, pad_to: int | None, multiple: int = 1) -> list[dict]:
    """`collate` batches made before timing (a DataLoader collates while the GPU works). Their token tensors stay on
    the host (pinned on CUDA, as `train`'s loader pins them), so micro_step decides the padding on the host copy and
    moves them inside the timed step, as in `train`; the images and cached features were made on the device."""
    out = []
    for idx in order:
        rows = [samples[i] for i in idx]
        length = pad_to or -(-max(s.tokens for s in rows) // multiple) * multiple
        b = collate_samples(rows, bench.pad_id, images[idx], None if features is None else features[idx], length)
        if bench.device.type == "cuda":
            b = {k: v.pin_memory() if torch.is_tensor(v) and not v.is_cuda else v for k, v in b.items()}
        b["tokens"] = sum(s.tokens for s in rows)
        b["flops"] = sum(bench.flops.train(s.tokens, s.supervised, features is None) for s in rows)
        out.append(b)
    return out


def cached_features(model: MiniGPT4Qwen, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Q-Former outputs of every image, once: what training without augmentation can reuse every epoch."""
    with torch.inference_mode():
        return torch.cat([model.qformer_features(images[i : i + chunk]) for i in range(0, len(images), chunk)])


# --------------------------------------------------------------------------------------------- variants


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
        stop = timer(bench.device)
        features = cached_features(model, images).clone()
        extra["cache_s"] = stop()
    order = batch_order([s.tokens for s in samples], bs, by_length=not mode.pad_max, seed=a.seed)
    pad_to = a.seq_max + model.num_query_tokens if mode.pad_max else None
    batches = train_batches(bench, samples, order, images, features, pad_to, 64 if mode.static_compile else 1)
    step = optimizer_step(bench, mode, torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5))
    bench.reset_peak()
    # warm-up re-runs the first batches, so every variant times exactly the same samples; static shapes compile
    # once per distinct length, so their warm-up covers every batch
    warmup = len(batches) if mode.static_compile or a.warmup < 0 else a.warmup
    schedule = [batches[i % len(batches)] for i in range(warmup)] + batches

    with train_setup(model, mode):
        stop = timer(bench.device)
        for i, b in enumerate(schedule):
            if i == warmup:
                extra["warmup_s"] = stop()
                stop = timer(bench.device)
            loss = step(b)
        seconds = stop()
        if a.profile and bench.device.type == "cuda":
            extra.update(profile_steps(lambda: [step(b) for b in batches[:2]], 2))
    padded = sum(b["input_ids"].numel() for b in batches)
    tokens = sum(b["tokens"] for b in batches)
    extra.update(loss=float(loss) / supervised_tokens(batches[-1]), padding_frac=1 - tokens / padded)
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
    """Seed-style loss (padded to seq-max, HF full-vocab loss) and micro_step's loss (padded to the batch max) on the
    same samples, without gradients: the same objective."""
    a, model = bench.args, bench.model
    samples = bench.samples(a.batch_size, a.seed)
    images = bench.images(len(samples), a.seed)
    order = [list(range(len(samples)))]
    padded = train_batches(bench, samples, order, images, None, a.seq_max + model.num_query_tokens)[0]
    tight = train_batches(bench, samples, order, images, None, None)[0]
    n = supervised_tokens(tight)
    model.eval()
    with torch.no_grad():
        args = (bench.device, bench.precision, 1 / n, lambda loss: None)
        seed_loss = float(seed_micro_step(model, padded, *args, hf_loss=True)) / n
        fast_loss = float(train_step.micro_step(model, tight, *args)) / n
    return {"seed_style_loss": seed_loss, "fast_loss": fast_loss, "abs_diff": abs(seed_loss - fast_loss)}


GATE_LOSS_REL = 0.01
GATE_AGREE = 0.98


def fp8_gate(bench: Bench, recipes: list[str]) -> None:
    """The fp8 quality gate: the same projector training run without fp8 and with each `train.fp8` recipe (same
    start, same batches, --gate-steps steps of `fast-cached`, eager) must end with losses within 1% (mean per-token
    loss of the last tenth of the steps), and the trained projectors' greedy answers to --gate-questions questions
    (the same inference path, no fp8) must agree on >= 98%. One JSON line per recipe, with both numbers.

    Random LLM weights give near-tied logits, where a tiny projector difference flips an answer: the agreement is
    meaningful with real LLM weights (--llm DIR)."""
    a, model = bench.args, bench.model
    samples = bench.samples(a.batch_size * a.gate_steps, a.seed + 7)
    images = bench.images(len(samples), a.seed + 7)
    order = batch_order([s.tokens for s in samples], a.batch_size, by_length=True, seed=a.seed)
    batches = train_batches(bench, samples, order, images, cached_features(model, images), None)
    del images
    questions = bench.samples(a.gate_questions, a.seed + 8, 50, 70, 0.0)
    question_features = cached_features(model, bench.images(len(questions), a.seed + 8))
    start = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    tail = max(1, a.gate_steps // 10)

    def run(mode: TrainMode) -> tuple[list[float], list[list[int]]]:
        model.load_partial(start, "the gate's starting projector")
        step = optimizer_step(bench, mode, torch.optim.AdamW(param_groups(model, 0.05), lr=a.gate_lr))
        with train_setup(model, mode):
            losses = [float(step(b)) / supervised_tokens(b) for b in batches]
        return losses, greedy_answers(bench, questions, question_features)

    reference: list = []

    def gate(recipe: str) -> dict:
        if not reference:
            reference.extend(run(TrainMode(cached=True)))
        ref_losses, ref_answers = reference
        losses, answers = run(TrainMode(cached=True, fp8=recipe))
        ref_end, end = sum(ref_losses[-tail:]) / tail, sum(losses[-tail:]) / tail
        rel = abs(end - ref_end) / abs(ref_end)
        agree = sum(x == y for x, y in zip(answers, ref_answers, strict=True)) / len(answers)
        return {"steps": a.gate_steps, "batch_size": a.batch_size, "ref_precision": bench.precision,
                "loss_start": ref_losses[0], "loss_ref": ref_end, "loss_fp8": end, "loss_rel_diff": rel,
                "answers_agree": agree, "questions": len(answers), "loss_ok": rel <= GATE_LOSS_REL,
                "answers_ok": agree >= GATE_AGREE, "passed": rel <= GATE_LOSS_REL and agree >= GATE_AGREE}

    try:
        for recipe in recipes:
            bench.attempt(f"fp8-gate-{recipe}", partial(gate, recipe))
    finally:
        model.load_partial(start, "the gate's starting projector")


def greedy_answers(bench: Bench, questions: list[Sample], features: torch.Tensor) -> list[list[int]]:
    """Greedy answer ids (--eval-new-tokens, default 8) of image questions, --eval-batch at a time, HF generate."""
    a, model = bench.args, bench.model
    model.eval()
    eos, out = [bench.eos_id], []
    with torch.inference_mode():
        for i in range(0, len(questions), a.eval_batch):
            b = to_device(collate_samples(questions[i : i + a.eval_batch], bench.pad_id, left=True), bench.device)
            embeds = model.inputs_embeds(b["input_ids"], features=features[i : i + a.eval_batch])
            rows = hf_generate(model, embeds, b["attention_mask"], a.eval_new_tokens or 8, eos, bench.pad_id)
            out += [answer_ids(r, eos) for r in rows.cpu()]
    return out


def probe_memory(bench: Bench, ckpt: bool) -> dict:
    """Largest `fast` micro-batch that trains a step: doubling from 8 until OOM, then two bisection steps.

    Batches are padded to the longest sample of the mix (seq-max + image positions): the size found then fits every
    batch of the mix, whatever the length grouping puts together.
    """
    a, model = bench.args, bench.model
    longest = a.seq_max + model.num_query_tokens
    mode = TrainMode(ckpt=ckpt)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5)
    step = optimizer_step(bench, mode, optimizer)

    def fits(bs: int) -> float | None:
        """Peak GiB of one training step at batch `bs`, None on OOM."""
        bench.reset_peak()
        ok = False
        try:
            samples = bench.samples(bs, a.seed + bs)
            b = train_batches(bench, samples, [list(range(bs))], bench.images(bs, a.seed), None, longest)[0]
            with train_setup(model, mode):
                step(b)
            sync(bench.device)
            ok = True
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to get workspace
            if not is_oom(exc):
                raise
        b = None
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
