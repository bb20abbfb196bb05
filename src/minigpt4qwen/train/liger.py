"""Liger-Kernel's fused Triton kernels in training (`train.liger`).

    pip install liger-kernel==0.8.5                  # CUDA + triton; the wheel is pure Python
    minigpt4qwen train --config configs/minigpt4qwen-7b.yaml train.liger=true

Two parts:
- the answer loss becomes Liger's fused linear cross-entropy: lm_head and the loss in one chunked kernel that never
  keeps logits. MiniGPT4Qwen.forward still picks the supervised positions first (labels -100 are dropped before the
  kernel sees them) and still returns the SUM of token losses, so the loop's 1 / step-tokens scaling is unchanged;
- the LLM's RMSNorm, RoPE and SwiGLU MLP run Liger's kernels, through Liger's own model patcher for the LLM's
  `model_type` (Qwen-1 checkpoints are converted to Qwen2 modules on load, so Qwen-7B gets the Qwen2 patch).
  Liger patches the transformers modeling module as well as the loaded instance: models built later in the same
  process get the kernels too (`apply_liger` returns an undo for the bench, which shares one model).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..config import Config, ConfigError
from ..data.conversation import IGNORE_INDEX

INSTALL_HINT = "train.liger needs CUDA and `pip install liger-kernel==0.8.5`"


def check_liger(cfg: Config, device: torch.device) -> None:
    """Refuse train.liger where it cannot run, with one line, before anything is built; never fall back silently."""
    if not cfg.train.liger:
        return
    require_liger(device)
    if cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3:
        raise ConfigError("train.liger does not work with DeepSpeed ZeRO-3: the fused loss reads lm_head's weight "
                          "outside lm_head's forward, where ZeRO-3 has not gathered it; use engine.name=fsdp or "
                          "engine.zero_stage<=2")


def require_liger(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"{INSTALL_HINT} (this run's device is {device})")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(f"{INSTALL_HINT} (liger_kernel is not importable here)")


def apply_liger(model: nn.Module, layer_kernels: bool = True) -> Callable[[], None]:
    """Liger's kernels in a MiniGPT4Qwen (see the module docstring); returns a function that undoes it.
    `layer_kernels=False` keeps only the fused loss: with train.compile the decoder layers are compiled, inductor
    fuses their norm / RoPE / SwiGLU already, and Liger's RMSNorm inside a compiled layer failed to trace (dynamo
    AssertionError at `input_layernorm`, torch 2.11, H200, 2026-11-28). The loss runs outside the compiled layers."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    model_type = getattr(llm.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"train.liger: Liger-Kernel has no kernels for LLM model_type {model_type!r}; set "
                          "train.liger=false")
    modeling = sys.modules[type(llm).__module__]
    targets = [modeling, *llm.modules()]
    before = [dict(vars(t)) for t in targets]
    # fused_linear_cross_entropy=False: Liger's would replace the HF forward we do not call; ours is set below
    if layer_kernels:
        _apply_liger_kernel_to_instance(llm, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    model.fused_linear_ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum").forward
    # exactly what the patcher changed (module functions, bound forwards, norm settings), so that an undo leaves
    # alone what changed since for other reasons (train/eval mode, gradient checkpointing flags)
    changed = [(vars(t), old, [k for k in {*old, *vars(t)} if vars(t).get(k, _MISSING) is not old.get(k, _MISSING)])
               for t, old in zip(targets, before, strict=True)]

    def undo() -> None:
        model.fused_linear_ce = None
        for now, old, keys in changed:
            for k in keys:
                if k in old:
                    now[k] = old[k]
                else:
                    now.pop(k, None)

    return undo


_MISSING = object()
