"""Run-directory checkpoints: trainable weights as safetensors + a separate training-state file, saved atomically.

    RUN_DIR/
      config.yaml                     the full config the run was started with
      checkpoints/step-00000120/      trainable.safetensors, training_state.pt, meta.json
                                      (+ deepspeed/ or fsdp/: the engine's own, possibly sharded, state)
      checkpoints/latest              name of the newest complete checkpoint
      log.jsonl, tb/, loss.png

A checkpoint directory is written under a temporary name and renamed when complete, and `latest` is replaced
atomically, so a SIGKILL at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
STATE = "training_state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (other ranks, a resume after SIGKILL) see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tmp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is assembled (by every rank) before it is renamed into place."""
    return Path(run_dir) / "checkpoints" / f".step-{step:08d}.tmp"


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """Create the temporary directory a checkpoint is written into (engines add their shards to it)."""
    tmp = tmp_checkpoint_dir(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_checkpoint(
    tmp: Path, weights: dict[str, torch.Tensor], training_state: dict, meta: dict, keep_last: int = 2
) -> Path:
    """Write our files into `tmp`, fsync everything, rename it to its final name and point `latest` at it."""
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(training_state, tmp / STATE)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    ckpt_root = tmp.parent
    name = tmp.name[1:-len(".tmp")]
    final = ckpt_root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    write_text_atomic(ckpt_root / "latest", name)
    if keep_last > 0:
        done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    run_dir: Path, step: int, weights: dict[str, torch.Tensor], training_state: dict, meta: dict, keep_last: int = 2
) -> Path:
    """Single-process save: everything a checkpoint holds comes from this process."""
    return finish_checkpoint(begin_checkpoint(run_dir, step), weights, training_state, meta, keep_last)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run (or the path itself if it is a checkpoint directory)."""
    path = Path(run_dir)
    if (path / WEIGHTS).is_file():
        return path
    root = path / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / WEIGHTS).is_file():
            return cand
    done = sorted(p for p in root.glob("step-*") if (p / WEIGHTS).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / WEIGHTS))


def load_training_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=False)
