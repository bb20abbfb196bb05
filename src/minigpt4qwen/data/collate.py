"""Batching: right-pad ids/labels, concatenate the images of all samples in sample order."""

from __future__ import annotations

import math

import torch

from .conversation import IGNORE_INDEX


def right_padded(mask: torch.Tensor) -> bool:
    """Every row is ones then zeros, as `collate` pads. Meant for the CPU copy of a batch (no device sync)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())


AUTO_MULTIPLE = 0
"""`multiple` value for data.pad_to_multiple_of's auto rule on CUDA: 64 for rows of >= LONG_ROW positions, else 1."""
LONG_ROW = 512


def pad(rows: list, value: int, length: int | None = None, left: bool = False,
        multiple: int = 1, floor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The one padding routine (training batches, the bench, batched generation): token rows -> an (N, L) long
    tensor filled with `value` where a row has no token, and its 0/1 attention mask. L is the longest row, or
    `length` if larger (fixed shapes), rounded up to `multiple` (AUTO_MULTIPLE: see there) and to `floor` (fp8
    training: torch._scaled_mm needs the token count divisible by 16); `left` puts the padding before the tokens."""
    width = max([length or 0, *(len(r) for r in rows)])
    if multiple == AUTO_MULTIPLE:
        multiple = 64 if width >= LONG_ROW else 1
    multiple = math.lcm(multiple, floor)
    width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        out[i, cols] = torch.as_tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask


def collate(items: list[dict | None], pad_id: int, length: int | None = None, left: bool = False,
            multiple: int = 1, floor: int = 1) -> dict:
    """Skipped (None) items are dropped and counted in `skipped`. Padding: see `pad` (training uses the default,
    right padding to the batch's longest row)."""
    kept = [x for x in items if x is not None]
    batch: dict = {"skipped": len(items) - len(kept), "size": len(kept)}
    if not kept:
        return batch
    ids, mask = pad([x["input_ids"] for x in kept], pad_id, length, left, multiple, floor)
    labels, _ = pad([x["labels"] for x in kept], IGNORE_INDEX, length, left, multiple, floor)
    pixels = [x["pixel_values"] for x in kept if x["pixel_values"] is not None]
    feats = [x["features"] for x in kept if x.get("features") is not None]
    batch.update(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        pixel_values=torch.cat(pixels) if pixels else None,
        features=torch.cat(feats) if feats else None,
        truncated=sum(bool(x["truncated"]) for x in kept),
    )
    return batch
