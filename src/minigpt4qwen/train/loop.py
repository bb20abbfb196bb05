"""Training workflow: setup -> fit -> save. One loop for CPU, one GPU and every multi-GPU engine (engines.py).

    minigpt4qwen train --config configs/demo.yaml [train.lr=3e-4 ...]
    minigpt4qwen train --resume RUN_DIR            # continue exactly where the last checkpoint left off
    torchrun --nproc_per_node=8 -m minigpt4qwen train --config cfg.yaml [engine.name=deepspeed engine.zero_stage=3]
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..data.collate import AUTO_MULTIPLE, collate
from ..data.dataset import InstructionDataset, ResumableSampler
from ..data.images import ImageProcessor
from ..models.minigpt4qwen import build_model, log_counts
from ..runs import (
    CONFIG,
    TOKENIZER,
    begin_checkpoint,
    finish_checkpoint,
    image_size,
    latest_checkpoint,
    load_training_state,
    make_template,
    read_meta,
    read_run_config,
    rng_state,
    save_run_config,
    set_rng_state,
    tmp_checkpoint_dir,
)
from .engines import Dist, Engine, build_engine, init_distributed, lr_at, oom_hint, param_groups, resolve_device
from .fp8 import FP8_TOKEN_MULTIPLE, check_fp8, convert_fp8, fsdp_float8_all_gather
from .liger import apply_liger, check_liger
from .step import micro_step, supervised_tokens

__all__ = ["lr_at", "param_groups", "resolve_device", "train"]

log = logging.getLogger("minigpt4qwen.train")


def setup_logging(run_dir: Path | None = None) -> None:
    """Console logging comes from the CLI's basicConfig; a run also logs to RUN_DIR/train.log."""
    root = logging.getLogger("minigpt4qwen")
    root.setLevel(logging.INFO)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


# --------------------------------------------------------------------------------------------- the run


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    samples: int = 0
    skipped: int = 0
    truncated: int = 0


def plot_losses(run_dir: Path) -> Path | None:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per supervised token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cache_image_features(cfg: Config, model, dataset: InstructionDataset) -> None:
    """Fill the dataset's per-image Q-Former feature cache; refuses when features would change per epoch."""
    t = cfg.model.trainable
    if cfg.data.random_resized_crop or cfg.data.hflip or t.vision != "frozen" or t.qformer != "frozen":
        raise ConfigError("data.cache_features needs data.random_resized_crop=false, data.hflip=false and frozen "
                          "model.trainable.vision/qformer (cached features cannot change between epochs)")
    start = time.time()
    was_training = model.training
    model.eval()
    dataset.cache_features(model.qformer_features, batch_size=64)
    model.train(was_training)
    log.info("cached Q-Former features of %d images in %.1f s", len(dataset.features), time.time() - start)


class DiskFullError(OSError):
    """Too little free disk for the next checkpoint; raised before anything of it is written."""


FULL_WEIGHTS_EVERY_SAVE = 2**26  # trainable parameters (256 MB in fp32) up to which every save writes the file


def checkpoint_bytes(run_dir: Path, n_trainable: int) -> int:
    """Disk one more checkpoint needs: the newest complete one's size, else 16 bytes per trainable parameter (fp32
    weights + AdamW's two moments + DeepSpeed's fp32 master copy), plus 10% and 64 MB of slack."""
    ckpt = latest_checkpoint(run_dir)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if ckpt is not None else 16 * n_trainable
    return int(size * 1.1) + 64 * 2**20


def save_due(step: int, total: int, steps_per_epoch: int, tc) -> bool:
    """The save schedule: the last step, every save_every_steps steps, the end of every save_every_epochs-th epoch."""
    if step >= total or (tc.save_every_steps and step % tc.save_every_steps == 0):
        return True
    return bool(tc.save_every_epochs) and step % (steps_per_epoch * tc.save_every_epochs) == 0


def _profiler(tc, run_dir: Path, dist_: Dist, start_step: int):
    """torch.profiler over train.profile_steps = [first, count] (main process only), or None. Call .step() after
    every optimizer step; the files are written when the last profiled step ends."""
    if not tc.profile_steps or not dist_.main or tc.profile_steps[0] <= start_step:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    first, count = tc.profile_steps
    out = run_dir / "profile"
    device_sort = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"

    def write(prof) -> None:
        out.mkdir(parents=True, exist_ok=True)
        avg = prof.key_averages()
        # a run that stops inside the window writes what it recorded (profile.stop): name the steps that were
        last = min(first + count - 1, start_step + prof.step_num)
        (out / "ops.txt").write_text(
            f"# optimizer steps {first}..{last}, sorted by {device_sort}\n"
            + avg.table(sort_by=device_sort, row_limit=40, max_name_column_width=60)
            + "\n# sorted by self CPU time\n" + avg.table(sort_by="self_cpu_time_total", row_limit=25,
                                                           max_name_column_width=60))
        prof.export_chrome_trace(str(out / "trace.json"))
        log.info("profile of steps %d..%d written to %s", first, last, out)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    # step k of the schedule = the optimizer step start_step + k + 1; one warm-up step before recording
    wait = first - start_step - 1
    return profile(activities=activities, on_trace_ready=write, record_shapes=False,
                   schedule=schedule(wait=max(wait - 1, 0), warmup=min(wait, 1), active=count, repeat=1))


def _truncate_log(path: Path, step: int) -> None:
    """After a resume, drop log lines written after the checkpoint (they will be produced again)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def _step_plan(dist_: Dist, micro: list[dict]) -> tuple[list[int], int]:
    """Which micro-batches run and the step's GLOBAL supervised-token count (one all-reduce).

    A micro-batch runs only where every rank has supervised tokens in it, so that the ranks' forward/backward
    calls (and the collectives inside them) stay matched; with one process this is "skip empty batches".
    """
    counts = [supervised_tokens(b) for b in micro]
    sums = dist_.sum([*counts, *(float(c == 0) for c in counts)])
    use = [i for i in range(len(micro)) if sums[len(micro) + i] == 0]
    return use, int(sum(sums[i] for i in use))


def _check_resume_layout(ckpt: Path, total: int, global_batch: int) -> None:
    """The schedule (total steps) and the data position (samples per step) must be those the checkpoint was made
    with, or the run would silently continue on another LR curve from another place in the data."""
    meta = read_meta(ckpt)
    for key, now, what in (("total_steps", total, "train.epochs/max_steps"),
                           ("global_batch", global_batch, "processes x train.batch_size x train.grad_accum")):
        if key in meta and meta[key] != now:
            raise ConfigError(f"{ckpt}: made with {key}={meta[key]}, this run has {now}; resume with the same "
                              f"{what} (to train further, start a new run from its weights)")


def _resume_rng(ts: dict, dist_: Dist) -> dict:
    per_rank = ts.get("rng_per_rank") or [ts["rng"]]
    if len(per_rank) != dist_.world_size:
        log.warning("checkpoint was written by %d process(es), this run has %d: data order and RNG restart from "
                    "rank 0's state, so the continuation is not bit-exact", len(per_rank), dist_.world_size)
        return per_rank[0]
    return per_rank[dist_.rank]


def existing_run(run_dir: Path) -> str | None:
    """What in `run_dir` shows an earlier run (that a fresh start would overwrite), or None."""
    if (run_dir / "config.yaml").is_file():
        return "config.yaml"
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        return "checkpoints/"
    if (run_dir / "log.jsonl").is_file():
        return "log.jsonl"
    return None


Evaluator = Callable[..., object]
"""A hook the loop calls every `eval.every_n_epochs` epochs on rank 0 of a plain/DDP run, after the checkpoint:
`evaluate(cfg, model, tokenizer, template, run_dir, step, writer)`. The CLI passes the hook that
eval.training.training_evaluator builds (MME, POPE, MMBench as eval.* asks); the loop imports nothing from eval/."""


def train(cfg: Config | None = None, resume: str | Path | None = None, overrides: list[str] = (),
          overwrite: bool = False, evaluate: Evaluator | None = None) -> Path:
    """Run (or resume) training; returns the run directory. Every process of a launched job calls this.

    A fresh start never writes into a directory that holds a run: it refuses, unless `overwrite` deletes it first.
    `evaluate`: see Evaluator.
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CONFIG).is_file():
            raise FileNotFoundError(f"{run_dir} has no {CONFIG}: not a run directory to resume")
        cfg = cfg or read_run_config(run_dir, overrides)
    assert cfg is not None
    run_dir = Path(resume) if resume is not None else Path(cfg.train.output_dir)
    dist_ = init_distributed(cfg)
    try:
        if resume is None:
            found = existing_run(run_dir) if dist_.main else None
            if dist_.sum([float(found is not None)])[0]:  # collective: every rank decides together
                if not overwrite:
                    raise ConfigError(
                        f"{run_dir} already holds a run ({found or 'see rank 0'}); continue it with `minigpt4qwen "
                        f"train --resume {run_dir}`, choose another train.output_dir, or pass --overwrite to "
                        "delete it and start afresh")
                if dist_.main:
                    log.warning("--overwrite: deleting the run in %s", run_dir)
                    shutil.rmtree(run_dir)
                dist_.barrier()
        return _fit(cfg, run_dir, resume is not None, dist_, evaluate)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def cap_memory(device: torch.device, gib: float) -> None:
    """train.max_memory_gib: this process may allocate at most `gib` GiB of the GPU (0: no cap)."""
    if gib <= 0:
        return
    if device.type != "cuda":
        raise ConfigError(f"train.max_memory_gib caps GPU memory; this run is on {device} (set it to 0)")
    total = torch.cuda.get_device_properties(device).total_memory
    if gib * 2**30 > total:
        raise ConfigError(f"train.max_memory_gib={gib:g} is more than the {total / 2**30:.1f} GiB of {device}")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)
    log.info("GPU memory capped at %.1f GiB of %.1f (train.max_memory_gib)", gib, total / 2**30)


def _fit(cfg: Config, run_dir: Path, resuming: bool, dist_: Dist, evaluate: Evaluator | None) -> Path:
    tc, device = cfg.train, dist_.device
    if dist_.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:  # a resume rewrites it once the checkpoint is known to fit (below)
            save_run_config(cfg, run_dir)
        setup_logging(run_dir)
    else:
        logging.getLogger("minigpt4qwen").setLevel(logging.WARNING)
    precision = ("bf16" if device.type == "cuda" else "fp32") if tc.precision == "auto" else tc.precision
    check_fp8(cfg, device)  # before the (long) model load
    check_liger(cfg, device)
    cap_memory(device, tc.max_memory_gib)
    torch.manual_seed(tc.seed)

    built = build_model(cfg.model, device)
    model, tokenizer = built.model, built.tokenizer
    log.info("model built on %s, precision %s, engine %s x %d process(es)\n%s", device, precision, cfg.engine.name,
             dist_.world_size, log_counts(built.counts))
    if tc.grad_checkpointing_llm:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.grad_checkpointing_vision:
        model.vision_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # fp8 and Liger change the decoder's modules: after the trainable set is decided (a frozen Linear may be cast
    # once), before torch.compile traces the layers and before the engine wraps them (FSDP2 must see Float8Linear)
    if tc.fp8 != "off":
        n = convert_fp8(model, tc.fp8, tc.fp8_frozen, fsdp_all_gather=fsdp_float8_all_gather(cfg))
        log.info("train.fp8=%s: %d LLM decoder Linears compute in fp8 (frozen ones: %s)", tc.fp8, n, tc.fp8_frozen)
    if tc.liger:
        apply_liger(model, layer_kernels=not tc.compile)
        log.info("train.liger: Liger fused linear cross-entropy%s",
                 " (the compiled layers keep inductor's fusions)" if tc.compile else ", RMSNorm, RoPE and SwiGLU")
    if tc.compile:
        n = model.compile_decoder_layers(tc.compile_backend)
        log.info("torch.compile (%s) on %d LLM decoder layers: the first steps include compiling", tc.compile_backend, n)
    if dist_.main:
        tokenizer.save_pretrained(run_dir / TOKENIZER)

    template = make_template(cfg, tokenizer, model.image_token_id)
    processor = ImageProcessor(image_size(cfg, model), train=True, crop_scale_min=cfg.data.crop_scale_min,
                               hflip=cfg.data.hflip, random_resized_crop=cfg.data.random_resized_crop)
    dataset = InstructionDataset(cfg.data.train, template, processor, cfg.data, seed=tc.seed)
    if cfg.data.cache_features:
        cache_image_features(cfg, model, dataset)
    # rank r takes every world_size-th sample: 2 ranks x batch b see per step what 1 rank x batch 2b sees
    lengths = None
    if cfg.data.group_by_length and tc.batch_size * dist_.world_size > 1:
        lengths = dataset.lengths()
    sampler = ResumableSampler(len(dataset), tc.seed, rank=dist_.rank, world_size=dist_.world_size,
                               lengths=lengths, batch_size=tc.batch_size * tc.grad_accum,
                               window=cfg.data.length_window)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multiple = cfg.data.pad_to_multiple_of or (AUTO_MULTIPLE if device.type == "cuda" else 1)
    floor = FP8_TOKEN_MULTIPLE if tc.fp8 != "off" else 1  # fp8 matmuls of the backward need it
    # its own generator: creating an iterator then draws no number from the global RNG, which a resume restores
    # and dropout / LoRA dropout draw from (one extra draw shifted every later mask after a resume)
    loader_gen = torch.Generator()
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=lambda items: collate(items, pad_id, multiple=multiple, floor=floor),
                        pin_memory=device.type == "cuda", generator=loader_gen)
    micro_per_epoch = math.ceil(len(sampler) / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total = tc.max_steps if tc.max_steps > 0 else tc.epochs * steps_per_epoch
    log.info("data: %d samples (%d rows skipped), global batch %d (%d process(es) x %d x accum %d), %d steps/epoch, "
             "%d steps total", len(dataset), dataset.stats.skipped_rows, dist_.world_size * tc.batch_size *
             tc.grad_accum, dist_.world_size, tc.batch_size, tc.grad_accum, steps_per_epoch, total)

    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: every part in model.trainable is frozen")
    ckpt = latest_checkpoint(run_dir) if resuming else None
    if ckpt is not None:
        _check_resume_layout(ckpt, total, dist_.world_size * tc.batch_size * tc.grad_accum)
    if resuming and dist_.main:
        save_run_config(cfg, run_dir)
    engine = build_engine(model, cfg, dist_, total, precision)
    state = RunState()

    if ckpt is not None:
        ts = load_training_state(ckpt)
        engine.load(ckpt, ts)
        state = RunState(**ts["run"])
        set_rng_state(_resume_rng(ts, dist_))
        if dist_.main:
            _truncate_log(run_dir / "log.jsonl", state.step)
        log.info("resumed from %s at step %d", ckpt, state.step)
    elif dist_.main and resuming:
        log.info("no checkpoint in %s yet: starting from step 0", run_dir)
        _truncate_log(run_dir / "log.jsonl", 0)
    elif dist_.main:
        (run_dir / "log.jsonl").write_text("")
    report_memory = tc.report_memory and device.type == "cuda"
    if report_memory:
        torch.cuda.reset_peak_memory_stats(device)  # the table wants training peaks, not build-time transients

    writer = None
    if dist_.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.step + 1 if state.step else None)
    last_saved = state.step

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    pending: dict | None = None  # a checkpoint whose engine shards are still being written in the background

    def publish() -> None:
        """Rank 0 adds our files to the checkpoint whose shards every rank has finished and makes it `latest`."""
        nonlocal pending
        if pending is not None and dist_.main:
            final = finish_checkpoint(*pending["args"])
            log.info("checkpoint %s: training waited %.1f s, complete after %.1f s", final, pending["wait_s"],
                     time.time() - pending["start"])
        pending = None

    def flush() -> None:
        """Collective: wait for a background write, then publish it."""
        if pending is not None:
            engine.wait_saved()
            dist_.barrier()
            publish()

    def save() -> None:
        """Collective: every rank adds its engine shards, rank 0 writes our files and renames atomically."""
        nonlocal last_saved, pending
        flush()  # one checkpoint in flight at most
        start = time.time()
        need = checkpoint_bytes(run_dir, n_trainable) if dist_.main else 0
        free = shutil.disk_usage(run_dir).free if dist_.main else 0
        if dist_.sum([float(need > free)])[0]:  # every rank stops together, before anything is written
            raise DiskFullError(
                f"not enough disk space for checkpoint step {state.step} in {run_dir}: it needs about "
                f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free; free space, lower train.keep_last or save less "
                "often (train.save_every_steps / train.save_every_epochs)")
        tmp = begin_checkpoint(run_dir, state.step) if dist_.main else tmp_checkpoint_dir(run_dir, state.step)
        dist_.barrier()
        engine_state = engine.save(tmp)
        # a sharded engine's large trainable set (full LLM: 31 GB in fp32) is gathered into one file only at the
        # end; before that its engine state is the checkpoint (`convert zero-to-safetensors` builds the file)
        whole = engine.name in ("plain", "ddp") or n_trainable <= FULL_WEIGHTS_EVERY_SAVE or state.step >= total
        weights = engine.full_state_dict() if whole else None
        rngs = dist_.gather(rng_state())
        args = None
        if dist_.main:
            training_state = {**engine_state, "run": vars(state).copy(), "rng": rngs[0], "rng_per_rank": rngs}
            meta = {"step": state.step, "epoch": state.epoch, "total_steps": total, "engine": engine.name,
                    "world_size": dist_.world_size, "global_batch": dist_.world_size * tc.batch_size * tc.grad_accum}
            args = (tmp, weights, training_state, meta, tc.keep_last)
        pending = {"args": args, "start": start, "wait_s": time.time() - start}
        last_saved = state.step
        if not getattr(engine, "async_save", False):
            dist_.barrier()
            publish()

    engine.model.train()
    bar = tqdm(total=total, initial=state.step, desc="train", dynamic_ncols=True, file=sys.stderr,
               disable=not dist_.main)
    t0, samples0 = time.time(), state.samples
    prof = _profiler(tc, run_dir, dist_, state.step)
    if prof is not None:
        prof.start()
    try:
        while state.step < total:
            epoch = state.step // steps_per_epoch
            in_epoch = state.step - epoch * steps_per_epoch
            state.epoch = epoch
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch, start=in_epoch * tc.grad_accum * tc.batch_size)
            loader_gen.manual_seed(tc.seed * 1009 + epoch)  # worker seeds depend on the epoch only
            batches = iter(loader)
            for _ in range(in_epoch, steps_per_epoch):
                micro = []
                for _ in range(tc.grad_accum):
                    b = next(batches, None)
                    if b is None:
                        break
                    micro.append(b)
                use, n_tok = _step_plan(dist_, micro)
                loss_sum, samples, truncated = 0.0, 0, 0
                for i in use:
                    with engine.accumulate(is_last=i == use[-1]):
                        # DDP/ZeRO/FSDP average over ranks: x world_size makes it a sum over the global batch
                        loss = micro_step(engine.model, micro[i], device, precision, dist_.world_size / n_tok,
                                          engine.backward)
                    loss_sum += float(loss)
                    samples, truncated = samples + micro[i]["size"], truncated + micro[i]["truncated"]
                skipped = sum(b["skipped"] for b in micro)
                seq_tokens = sum(int(micro[i]["attention_mask"].sum()) for i in use)  # through the LLM, images too
                writing = float(pending is not None and not engine.save_done())
                loss_sum, samples, skipped, truncated, seq_tokens, writing = dist_.sum(
                    [loss_sum, samples, skipped, truncated, seq_tokens, writing])
                if pending is not None and not writing:  # every rank's background write has finished
                    publish()
                loss_val = loss_sum / max(n_tok, 1)
                if not math.isfinite(loss_val):  # before the update: the saved state stays the last finite one
                    raise FloatingPointError(f"loss is {loss_val} at step {state.step + 1}; lower train.lr or use fp32")
                state.samples, state.skipped = state.samples + int(samples), state.skipped + int(skipped)
                state.truncated += int(truncated)
                lr = engine.lr
                grad_norm = engine.step()
                state.step += 1
                if prof is not None:
                    prof.step()
                rate = (state.samples - samples0) / max(time.time() - t0, 1e-9)
                if dist_.main:
                    row = {"step": state.step, "epoch": epoch, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                           "tokens": n_tok, "seq_tokens": int(seq_tokens), "samples": int(samples),
                           "elapsed_s": round(time.time() - t0, 3)}
                    if report_memory:
                        row["mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                    with open(run_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    writer.add_scalar("train/loss", loss_val, state.step)
                    writer.add_scalar("train/lr", lr, state.step)
                    writer.add_scalar("train/samples_per_s", rate, state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
                if tc.log_every and state.step % tc.log_every == 0 and not sys.stderr.isatty():
                    log.info("step %d/%d loss %.4f lr %.3e %.1f samples/s", state.step, total, loss_val, lr, rate)
                end_of_epoch = state.step % steps_per_epoch == 0
                if save_due(state.step, total, steps_per_epoch, tc):
                    save()
                if end_of_epoch and evaluate is not None and cfg.eval.every_n_epochs > 0 \
                        and (epoch + 1) % cfg.eval.every_n_epochs == 0:
                    flush()  # the hook may read the checkpoint just saved
                    _evaluate(cfg, engine, tokenizer, template, run_dir, state.step, writer, evaluate)
                if state.step >= total:
                    break
    except BaseException as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            log.error(oom_hint(cfg))
        if state.step > last_saved and dist_.world_size == 1 and not isinstance(exc, DiskFullError):
            log.error("training stopped at step %d: saving what was trained before re-raising", state.step)
            save()
            flush()
        elif state.step > last_saved:  # other ranks may be gone: a collective save could hang
            log.error("training stopped at step %d; the last checkpoint is step %d", state.step, last_saved)
        raise
    finally:
        if prof is not None:
            prof.stop()
        bar.close()
        if writer is not None:
            writer.close()
    flush()
    if state.skipped or state.truncated:
        log.info("data: %d samples skipped, %d truncated to max_txt_len", state.skipped, state.truncated)
    if dist_.main:
        log.info("done: %d steps; loss curve %s", state.step, plot_losses(run_dir))
    return run_dir


def _evaluate(cfg: Config, engine: Engine, tokenizer, template, run_dir: Path, step: int, writer,
              evaluate: Evaluator) -> None:
    """Evaluation during training needs whole weights in one process: rank 0 of a plain/DDP run; others wait."""
    if engine.name not in ("plain", "ddp"):
        log.warning("evaluation during training is skipped with engine %s: run `minigpt4qwen eval all` on the "
                    "checkpoint", engine.name)
        return
    if engine.dist.main:
        evaluate(cfg, engine.module, tokenizer, template, run_dir, step, writer)
    engine.module.train()
    engine.dist.barrier()
