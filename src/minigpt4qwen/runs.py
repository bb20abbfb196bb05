"""Run directories: the one place that knows their format. Training writes them; chat, web UI, API, eval and convert
read them through `load_run`, from any working directory.

    run = load_run("runs/minigpt4qwen-7b", device="cuda")      # or .../checkpoints/step-00000120
    run.model, run.tokenizer, run.template, run.processor       # what answering a question needs
    run.cfg, run.run_dir, run.checkpoint                         # where it came from (paths in cfg are absolute)

    RUN_DIR/
      config.yaml                     the full config of the run (its paths: see below)
      tokenizer/                      the tokenizer as trained (with the image token the run may have added)
      checkpoints/step-00000120/      trainable.safetensors, training_state.pt (+ deepspeed/ or fsdp/: the engine's
                                      own, possibly sharded, state), meta.json (written last)
      checkpoints/latest              name of the newest complete checkpoint
      log.jsonl, train.log, tb/, loss.png, eval/

Paths in config.yaml. A path inside the run directory is stored relative to it, every other path absolute, and
`train.output_dir` as "." (the run directory is wherever its config.yaml is). A run moved or copied elsewhere keeps
working with what it holds (an export holds everything); what lies outside it is found at its absolute place.
Reading resolves relative paths against the run directory. Runs written before this rule (their output_dir is not
".") kept paths relative to the folder training started in: each such path resolves against the run directory if
it exists there (older exports), else against that folder (the run directory's path minus a relative output_dir,
when it ends so), else against the working directory, as those versions did.

Checkpoints. A checkpoint is assembled under a temporary name, renamed when complete, and then `latest` is
replaced atomically, so a SIGKILL at any moment leaves the previous checkpoint intact. A step-* directory counts as
complete only when every file the writer writes is there, meta.json (written last) included: a half-copied or
half-deleted directory is never resumed from. keep_last counts complete checkpoints only and never deletes the one
`latest` names.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import Config, load_config, map_paths, save_config, write_text_atomic
from .data.conversation import ChatTemplate
from .data.images import ImageProcessor
from .models.minigpt4qwen import MiniGPT4Qwen, build_model

__all__ = [
    "CONFIG", "DS_TAG", "FSDP_DIR", "META", "STATE", "TOKENIZER", "WEIGHTS", "Run", "begin_checkpoint",
    "complete_checkpoints", "consolidate",
    "find_run", "finish_checkpoint", "image_size", "is_complete", "latest_checkpoint", "load_run",
    "load_training_state", "load_weights", "make_template", "prune_checkpoints", "read_meta", "read_run_config",
    "relocatable", "resolved", "rng_state", "save_checkpoint", "save_run_config", "set_rng_state",
    "tmp_checkpoint_dir", "write_text_atomic",
]

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
WEIGHTS = "trainable.safetensors"
STATE = "training_state.pt"
META = "meta.json"
DS_TAG = "deepspeed"  # engine state folders inside a checkpoint (train/engines.py writes them)
FSDP_DIR = "fsdp"


# --------------------------------------------------------------------------------------------- config.yaml


def _abs(path: str | Path) -> Path:
    """Absolute without resolving symlinks (a path given through a link keeps naming the link)."""
    return Path(os.path.abspath(path))


def relocatable(cfg: Config, run_dir: str | Path) -> Config:
    """`cfg` as a run's config.yaml stores it: paths inside `run_dir` relative to it, the rest absolute.

    Relative paths in `cfg` are read against the working directory (the command line's meaning)."""
    root = _abs(run_dir)

    def store(value: str) -> str:
        path = _abs(value)
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    out = map_paths(cfg, store)
    out.train.output_dir = "."
    return out


def resolved(cfg: Config, run_dir: str | Path) -> Config:
    """A run's stored config with every path absolute (the module docstring gives the rule)."""
    root = _abs(run_dir)
    if cfg.train.output_dir == ".":
        out = map_paths(cfg, lambda value: os.path.normpath(root / value))
    else:  # written before paths were stored run-relative
        started = _started_in(root, cfg.train.output_dir)

        def find(value: str) -> str:
            for base in (root, started):
                if base is not None and not Path(value).is_absolute() and (base / value).exists():
                    return os.path.normpath(base / value)
            return value

        out = map_paths(cfg, find)
    out.train.output_dir = str(root)
    return out


def _started_in(root: Path, output_dir: str) -> Path | None:
    """The folder an older run was started in: its path without the relative output_dir it was given."""
    tail = Path(os.path.normpath(output_dir)).parts
    if Path(output_dir).is_absolute() or ".." in tail or tail == (".",) or root.parts[-len(tail):] != tail:
        return None
    return Path(*root.parts[:-len(tail)])


def save_run_config(cfg: Config, run_dir: str | Path) -> None:
    save_config(relocatable(cfg, run_dir), Path(run_dir) / CONFIG)


def read_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """RUN_DIR/config.yaml with absolute paths; `overrides` (command line, cwd-relative) apply after."""
    return load_config(Path(run_dir) / CONFIG, overrides, relocate=lambda cfg: resolved(cfg, run_dir))


# --------------------------------------------------------------------------------------------- checkpoints


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def tmp_checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is assembled (by every rank) before it is renamed into place."""
    return Path(run_dir) / "checkpoints" / f".step-{step:08d}.tmp"


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create the temporary directory a checkpoint is written into (engines add their shards to it)."""
    tmp = tmp_checkpoint_dir(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_checkpoint(
    tmp: Path, weights: dict[str, torch.Tensor] | None, training_state: dict, meta: dict, keep_last: int = 2
) -> Path:
    """Write our files into `tmp` (meta.json last), fsync everything, rename it to its final name, point `latest`
    at it and prune older checkpoints. `weights=None`: no trainable.safetensors (a sharded engine's large
    trainable set lives in its own state until the end of training or `convert zero-to-safetensors`)."""
    if weights is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(training_state, tmp / STATE)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    write_text_atomic(tmp / META, json.dumps(meta, indent=2))  # the mark: everything else is on disk already
    ckpt_root = tmp.parent
    name = tmp.name[1:-len(".tmp")]
    final = ckpt_root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    write_text_atomic(ckpt_root / "latest", name)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def save_checkpoint(
    run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], training_state: dict, meta: dict,
    keep_last: int = 2,
) -> Path:
    """Single-process save: everything a checkpoint holds comes from this process."""
    return finish_checkpoint(begin_checkpoint(run_dir, step), weights, training_state, meta, keep_last)


def is_complete(ckpt: Path) -> bool:
    """meta.json is written last; trainable.safetensors may be absent (see finish_checkpoint)."""
    return all((ckpt / name).is_file() for name in (STATE, META))


def _step(ckpt: Path) -> int:
    try:
        return int(ckpt.name.removeprefix("step-"))
    except ValueError:
        return -1


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete step-* directories under RUN_DIR/checkpoints, oldest first."""
    found = ckpt_root.glob("step-*") if ckpt_root.is_dir() else []
    return sorted((p for p in found if is_complete(p)), key=_step)


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` (0 = keep all), never the one `latest` names."""
    for leftover in ckpt_root.glob(".step-*.old"):  # a deletion a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return []
    pointer = ckpt_root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    old = [p for p in complete_checkpoints(ckpt_root)[:-keep_last] if p.name != named]
    for p in old:
        trash = p.with_name(f".{p.name}.old")
        os.replace(p, trash)  # the step-* name goes at once: a kill mid-delete leaves no half checkpoint behind it
        shutil.rmtree(trash, ignore_errors=True)
    return old


def latest_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint `latest` names if complete, else the newest complete one; a checkpoint directory given
    directly is taken as it is (reading its weights needs nothing else)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    root = path / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file() and (named := pointer.read_text().strip()) and is_complete(root / named):
        return root / named
    done = complete_checkpoints(root)
    return done[-1] if done else None


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's trainable weights; a sharded engine's checkpoint without the file gets it built once."""
    path = Path(ckpt) / WEIGHTS
    if not path.is_file() and ((Path(ckpt) / DS_TAG).is_dir() or (Path(ckpt) / FSDP_DIR).is_dir()):
        log.info("%s has no %s: building it from the engine state", ckpt, WEIGHTS)
        path = consolidate(ckpt)
    return load_file(str(path))


def consolidate(path: str | Path) -> Path:
    """One `trainable.safetensors` for a run directory or checkpoint of any engine; returns its path.

    Plain/DDP runs always write it; DeepSpeed/FSDP runs with a large trainable set (the full LLM) only at their
    last step. This builds it from a DeepSpeed (ZeRO-3 included) or FSDP/DCP state that lacks it, e.g. an
    intermediate stage-2 checkpoint, or one written by another DeepSpeed trainer (a dir with `latest`).
    """
    from safetensors.torch import save_file

    path = Path(path)
    ckpt = _checkpoint_dir(path)
    if (ckpt / WEIGHTS).is_file():
        return ckpt / WEIGHTS
    if (ckpt / DS_TAG).is_dir() or (ckpt / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = DS_TAG if (ckpt / DS_TAG).is_dir() else None
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag, exclude_frozen_parameters=True)
    elif (ckpt / FSDP_DIR).is_dir():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(ckpt / FSDP_DIR), f"{tmp}/full.pt")
            state = torch.load(f"{tmp}/full.pt", map_location="cpu", weights_only=False)["model"]
    else:
        raise FileNotFoundError(f"{path}: no {WEIGHTS}, DeepSpeed ({DS_TAG}/ or latest) or FSDP ({FSDP_DIR}/) state")
    out = ckpt / WEIGHTS
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(out))
    return out


def _checkpoint_dir(path: Path) -> Path:
    """The checkpoint a run directory's `latest` names (complete or not), else its newest, else `path` itself."""
    root = path / "checkpoints"
    if (root / "latest").is_file():
        return root / (root / "latest").read_text().strip()
    steps = sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []
    return steps[-1] if steps else path


def load_training_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=False)


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json (step, epoch, total_steps, engine, world_size, global_batch); {} if it has none."""
    meta = Path(ckpt) / META
    return json.loads(meta.read_text()) if meta.is_file() else {}


# --------------------------------------------------------------------------------------------- loading a run


def find_run(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory (its newest complete checkpoint) or a checkpoint in one."""
    path = Path(path)
    run_dir = path if (path / CONFIG).is_file() else path.parent.parent
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG}; pass a run directory written by `minigpt4qwen train` or a "
                                "checkpoint directory inside one")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint yet (checkpoints/step-*/ with {WEIGHTS}, {STATE} "
                                f"and {META})")
    return run_dir, ckpt


def make_template(cfg: Config, tokenizer, image_token_id: int) -> ChatTemplate:
    return ChatTemplate(tokenizer, image_token_id, cfg.model.num_query_tokens, cfg.data.system_prompt,
                        cfg.data.template)


def image_size(cfg: Config, model: MiniGPT4Qwen) -> int:
    return cfg.data.image_size or model.vision_model.config.image_size


@dataclass
class Run:
    """A run loaded for answering: what chat, web UI, API, eval and export share."""

    run_dir: Path
    checkpoint: Path
    cfg: Config
    """The config the model was built from: the run's, paths absolute, tokenizer = RUN_DIR/tokenizer if present."""
    model: MiniGPT4Qwen
    tokenizer: Any
    template: ChatTemplate
    processor: ImageProcessor
    """Eval-time image preprocessing: resize to the run's image size, no augmentation."""


def answer_device(device: str | torch.device | None = None) -> torch.device:
    """The device a run is loaded on for answering: `device` as given, else cuda when there is one, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_run(path: str | Path, device: str | torch.device | None = None, stage: bool = False) -> Run:
    """Build the model of a run directory (or one checkpoint directory in it) and load the checkpoint's weights.

    `stage`: build and load it on the CPU, in the dtypes `device` would get, and leave it there: the caller moves it
    (`quantize_for_inference` does, one decoder layer at a time; `Run.model.device` says where it is). Only for an
    LLM read from files, which are read into CPU memory first anyway: a `random:` preset is built on `device` as in
    training (the same random values; initialising a 7B model on a CPU took minutes on a 16-core host)."""
    run_dir, ckpt = find_run(path)
    cfg = read_run_config(run_dir)
    if (run_dir / TOKENIZER).is_dir():
        cfg.model.tokenizer = str(_abs(run_dir / TOKENIZER))
    dev = answer_device(device)
    torch.manual_seed(cfg.train.seed)  # parts without a checkpoint (random: presets) rebuild as in training
    stage = stage and not cfg.model.llm.startswith("random:")
    built = build_model(cfg.model, "cpu" if stage else dev, dtype_device=dev)
    built.model.load_partial(load_weights(ckpt), str(ckpt))
    log.info("loaded %s", ckpt)
    template = make_template(cfg, built.tokenizer, built.model.image_token_id)
    processor = ImageProcessor(image_size(cfg, built.model), train=False)
    return Run(_abs(run_dir), _abs(ckpt), cfg, built.model, built.tokenizer, template, processor)
