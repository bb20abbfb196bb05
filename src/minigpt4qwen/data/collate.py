"""Batching: right-pad ids/labels, concatenate the images of all samples in sample order."""

from __future__ import annotations

import torch

from .conversation import IGNORE_INDEX


def right_padded(mask: torch.Tensor) -> bool:
    """Every row is ones then zeros, as `collate` pads. Meant for the CPU copy of a batch (no device sync)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())


def collate(items: list[dict | None], pad_id: int) -> dict:
    """Skipped (None) items are dropped and counted in `skipped`."""
    kept = [x for x in items if x is not None]
    batch: dict = {"skipped": len(items) - len(kept), "size": len(kept)}
    if not kept:
        return batch
    length = max(len(x["input_ids"]) for x in kept)
    ids = torch.full((len(kept), length), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(kept), length), dtype=torch.long)
    for i, x in enumerate(kept):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
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
