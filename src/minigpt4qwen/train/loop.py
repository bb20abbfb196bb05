"""Training workflow: setup -> fit -> save. One loop for CPU and GPU.

    minigpt4qwen train --config configs/demo.yaml [train.lr=3e-4 ...]
    minigpt4qwen train --resume RUN_DIR            # continue exactly where the last checkpoint left off
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config, load_config, save_config
from ..data.collate import collate
from ..data.conversation import IGNORE_INDEX, ChatTemplate
from ..data.dataset import InstructionDataset, ResumableSampler
from ..data.images import ImageProcessor
from ..models.minigpt4qwen import build_model, log_counts
from .checkpoint import (
    latest_checkpoint,
    load_training_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

log = logging.getLogger("minigpt4qwen.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_logging(run_dir: Path | None = None) -> None:
    """Console logging comes from the CLI's basicConfig; a run also logs to RUN_DIR/train.log."""
    root = logging.getLogger("minigpt4qwen")
    root.setLevel(logging.INFO)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def make_template(cfg: Config, tokenizer, image_token_id: int) -> ChatTemplate:
    return ChatTemplate(tokenizer, image_token_id, cfg.model.num_query_tokens, cfg.data.system_prompt,
                        cfg.data.template)


def image_size(cfg: Config, model) -> int:
    return cfg.data.image_size or model.vision_model.config.image_size


# --------------------------------------------------------------------------------------------- optimisation


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and other 1-D parameters (as LAVIS does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or ".ln" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup from warmup_start_lr, then cosine from lr down to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / max(cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast_ctx(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def supervised_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if batch.get("size") else 0


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


def evaluate_during_training(cfg: Config, model, tokenizer, template, run_dir: Path, step: int, writer) -> dict:
    """MME on the weights just saved, in-process; scores go to TensorBoard and RUN_DIR/eval/mme-step-N/."""
    from ..eval.run import run_mme
    from ..serve.generate import Assistant

    assistant = Assistant(model, tokenizer, template, ImageProcessor(image_size(cfg, model), train=False))
    summary = run_mme(assistant, cfg.eval.mme_root, run_dir / "eval" / f"mme-step-{step:08d}", cfg.eval.batch_size,
                      cfg.eval.prompt_suffix, cfg.eval.max_new_tokens)
    writer.add_scalar("mme/perception", summary["perception"], step)
    writer.add_scalar("mme/cognition", summary["cognition"], step)
    for name, sub in summary["subtasks"].items():
        writer.add_scalar(f"mme/{name}", sub["score"], step)
    log.info("MME at step %d: perception %.2f cognition %.2f", step, summary["perception"], summary["cognition"])
    return summary


def _truncate_log(path: Path, step: int) -> None:
    """After a resume, drop log lines written after the checkpoint (they will be produced again)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: Config | None = None, resume: str | Path | None = None, overrides: list[str] = ()) -> Path:
    """Run (or resume) training; returns the run directory."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} has no config.yaml: not a run directory to resume")
        cfg = cfg or load_config(run_dir / "config.yaml", overrides)
    assert cfg is not None
    run_dir = Path(resume) if resume is not None else Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir)
    tc = cfg.train
    device = resolve_device(tc.device)
    precision = ("bf16" if device.type == "cuda" else "fp32") if tc.precision == "auto" else tc.precision
    torch.manual_seed(tc.seed)

    built = build_model(cfg.model, device)
    model, tokenizer = built.model, built.tokenizer
    log.info("model built on %s, precision %s\n%s", device, precision, log_counts(built.counts))
    if tc.grad_checkpointing_llm:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.grad_checkpointing_vision:
        model.vision_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokenizer.save_pretrained(run_dir / "tokenizer")

    template = make_template(cfg, tokenizer, model.image_token_id)
    processor = ImageProcessor(image_size(cfg, model), train=True, crop_scale_min=cfg.data.crop_scale_min,
                               hflip=cfg.data.hflip, random_resized_crop=cfg.data.random_resized_crop)
    dataset = InstructionDataset(cfg.data.train, template, processor, cfg.data, seed=tc.seed)
    sampler = ResumableSampler(len(dataset), tc.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=lambda items: collate(items, pad_id), pin_memory=device.type == "cuda")
    micro_per_epoch = math.ceil(len(dataset) / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total = tc.max_steps if tc.max_steps > 0 else tc.epochs * steps_per_epoch
    log.info("data: %d samples (%d rows skipped), %d steps/epoch, %d steps total", len(dataset),
             dataset.stats.skipped_rows, steps_per_epoch, total)

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every part in model.trainable is frozen")
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, tc) / tc.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = RunState()

    ckpt = latest_checkpoint(run_dir) if resume is not None else None
    if ckpt is not None:
        model.load_partial(load_weights(ckpt), str(ckpt))
        ts = load_training_state(ckpt)
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        scaler.load_state_dict(ts["scaler"])
        state = RunState(**ts["run"])
        set_rng_state(ts["rng"])
        _truncate_log(run_dir / "log.jsonl", state.step)
        log.info("resumed from %s at step %d", ckpt, state.step)
    elif resume is not None:
        log.info("no checkpoint in %s yet: starting from step 0", run_dir)
        _truncate_log(run_dir / "log.jsonl", 0)
    else:
        (run_dir / "log.jsonl").write_text("")

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.step + 1 if state.step else None)
    last_saved = state.step

    def save() -> None:
        nonlocal last_saved
        training_state = {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "run": vars(state).copy(), "rng": rng_state(),
        }
        meta = {"step": state.step, "epoch": state.epoch, "total_steps": total}
        path = save_checkpoint(run_dir, state.step, model.trainable_state_dict(), training_state, meta, tc.keep_last)
        last_saved = state.step
        log.info("saved %s", path)

    model.train()
    bar = tqdm(total=total, initial=state.step, desc="train", dynamic_ncols=True, file=sys.stderr)
    t0, samples0 = time.time(), state.samples
    try:
        while state.step < total:
            epoch = state.step // steps_per_epoch
            in_epoch = state.step - epoch * steps_per_epoch
            state.epoch = epoch
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch, start=in_epoch * tc.grad_accum * tc.batch_size)
            batches = iter(loader)
            for _ in range(in_epoch, steps_per_epoch):
                micro = []
                for _ in range(tc.grad_accum):
                    b = next(batches, None)
                    if b is None:
                        break
                    micro.append(b)
                n_tok = sum(supervised_tokens(b) for b in micro)
                loss_sum = 0.0
                for b in micro:
                    state.skipped += b["skipped"]
                    if not supervised_tokens(b):
                        continue
                    b = to_device(b, device)
                    with autocast_ctx(device, precision):
                        loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])
                    scaler.scale(loss / n_tok).backward()
                    loss_sum += float(loss.detach())
                    state.samples += b["size"]
                    state.truncated += b["truncated"]
                if tc.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm))
                else:
                    grad_norm = float("nan")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                state.step += 1
                loss_val = loss_sum / max(n_tok, 1)
                if not math.isfinite(loss_val):
                    raise FloatingPointError(f"loss is {loss_val} at step {state.step}; lower train.lr or use fp32")
                rate = (state.samples - samples0) / max(time.time() - t0, 1e-9)
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": state.step, "epoch": epoch, "loss": loss_val, "lr": lr,
                                        "grad_norm": grad_norm, "tokens": n_tok}) + "\n")
                writer.add_scalar("train/loss", loss_val, state.step)
                writer.add_scalar("train/lr", lr, state.step)
                writer.add_scalar("train/samples_per_s", rate, state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
                if tc.log_every and state.step % tc.log_every == 0 and not sys.stderr.isatty():
                    log.info("step %d/%d loss %.4f lr %.3e %.1f samples/s", state.step, total, loss_val, lr, rate)
                end_of_epoch = state.step % steps_per_epoch == 0
                if state.step >= total or end_of_epoch or (tc.save_every_steps and state.step % tc.save_every_steps == 0):
                    save()
                if end_of_epoch and cfg.eval.mme_root and cfg.eval.every_n_epochs > 0 \
                        and (epoch + 1) % cfg.eval.every_n_epochs == 0:
                    evaluate_during_training(cfg, model, tokenizer, template, run_dir, state.step, writer)
                    model.train()
                if state.step >= total:
                    break
    except BaseException:
        if state.step > last_saved:
            log.error("training stopped at step %d: saving what was trained before re-raising", state.step)
            save()
        raise
    finally:
        bar.close()
        writer.close()
    if state.skipped or state.truncated:
        log.info("data: %d samples skipped, %d truncated to max_txt_len", state.skipped, state.truncated)
    png = plot_losses(run_dir)
    log.info("done: %d steps; loss curve %s", state.step, png)
    return run_dir
