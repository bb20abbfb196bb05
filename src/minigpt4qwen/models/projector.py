"""The trainable bridge: one Linear from Q-Former width to LLM width (the seed's `llm_proj`)."""

from __future__ import annotations

from torch import nn

PROJECTORS = {"linear": lambda d_in, d_out: nn.Linear(d_in, d_out)}


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector {kind!r}; choose one of {', '.join(PROJECTORS)}")
    return PROJECTORS[kind](d_in, d_out)
