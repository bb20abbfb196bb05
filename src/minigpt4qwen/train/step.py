"""The training step's per-micro-batch work, shared by `train` (loop.py) and `bench train` (bench/), so that the
bench times exactly what training runs: move to the device, forward with the answer-only loss, scaled backward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..data.collate import right_padded
from ..data.conversation import IGNORE_INDEX


def autocast_ctx(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def supervised_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if batch.get("size") else 0


def micro_step(model: Callable, batch: dict, device: torch.device, precision: str, scale: float,
               backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Forward + backward of one micro-batch (a `collate` batch, on the CPU or already on `device`); returns the
    detached sum of its token losses. `scale` turns that sum into this micro-batch's share of the step's loss (the
    loop: world size / the step's global supervised tokens); `backward` is the engine's (DeepSpeed owns it)."""
    b = to_device(batch, device)
    # right padding, decided on the batch as given (the loop's CPU copy: no device sync): the causal mask alone
    # then suffices, see MiniGPT4Qwen.forward
    mask = None if right_padded(batch["attention_mask"]) else b["attention_mask"]
    with autocast_ctx(device, precision):
        loss, _ = model(b["input_ids"], mask, b["labels"], b["pixel_values"], b.get("features"))
    backward(loss * scale)
    return loss.detach()
