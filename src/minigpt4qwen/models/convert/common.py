"""Shared pieces of the converters: the one-line key/shape error, source tracking, checks against the target."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

class CheckpointKeyError(ValueError):
    """A checkpoint lacks weights a module needs, holds weights with no place in it, or holds them in another shape."""


class _Source:
    """One input state dict that records which keys were used, so the rest can be reported instead of lost silently.

    ``prefix`` lets the same code read EVA weights from ``eva_vit_g.pth`` (no prefix) or from a BLIP-2 checkpoint that
    embeds them (``visual_encoder.``); ``where`` names the file the user should look in when something is missing.
    ``origin`` maps each output name to the source key(s) it came from, for error messages in the source's terms.
    """

    def __init__(self, state: StateDict, label: str, where: str, prefix: str = "") -> None:
        self.state, self.label, self.where, self.prefix = state, label, where, prefix
        self.used: set[str] = set()
        self.missing: list[tuple[str, str]] = []  # (source key, our name)
        self.origin: dict[str, str] = {}

    def take(self, key: str, dst: str) -> Tensor | None:
        """The tensor under ``key`` (None if absent: raise_if_missing reports it), recorded as a source of ``dst``."""
        full = self.prefix + key
        self.origin[dst] = f"{self.origin[dst]} + {full}" if dst in self.origin else f"{self.label}:{full}"
        if full not in self.state:
            self.missing.append((full, dst))
            return None
        self.used.add(full)
        return self.state[full]

    def move(self, out: dict[str, Tensor | None], key: str, dst: str) -> None:
        out[dst] = self.take(key, dst)

    def raise_if_missing(self, what: str) -> None:
        if self.missing:
            (key, dst), n = self.missing[0], len(self.missing)
            raise CheckpointKeyError(
                f"{what} needs {n} key(s) the checkpoint lacks, the first {self.label}:{key} (ours: {dst}); "
                f"they should come from {self.where}"
            )

    def unused(self) -> list[str]:
        return [f"{self.label}:{k}" for k in self.state if k not in self.used]


def _check_against(
    state: StateDict, expected: Mapping[str, torch.Size], origin: Mapping[str, str], basis: str,
    fix: Callable[[str], str],
) -> None:
    """Converted weights against the parameters ``basis`` (a phrase: where ``expected`` comes from) gives. The first
    problem raises, in one line naming the source key, our key, both shapes and ``fix(our_key)``, what to do."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointKeyError(f"{len(missing)} weight(s) of {basis} have no key in the checkpoint, the first "
                                 f"{missing[0]}; {fix(missing[0])}")
    extra = [k for k in state if k not in expected]
    if extra:
        k = extra[0]
        raise CheckpointKeyError(f"{origin.get(k, k)} (ours: {k}) and {len(extra) - 1} more weight(s) have no place "
                                 f"in {basis}; {fix(k)}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k]):
            raise CheckpointKeyError(f"{origin.get(k, k)} (ours: {k}) has shape {list(t.shape)}, expected "
                                     f"{list(expected[k])} ({basis}); {fix(k)}")


def _meta_shapes(module_cls, config, prefix: str = "") -> dict[str, torch.Size]:
    """Parameter shapes of ``module_cls(config)``, built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        module = module_cls(config)
    return {prefix + k: p.shape for k, p in module.named_parameters()}


def _torch_load(path: str | Path) -> dict:
    """Load a pickled checkpoint safely (tensors and plain containers only) onto the CPU, memory-mapped if possible."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written before torch's zip format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dir(path: str | Path) -> StateDict:
    """All tensors of an HF-style weight directory: one or sharded safetensors, or one or sharded ``.bin`` files.

    Safetensors win when both are present because they load without unpickling.
    """
    from safetensors.torch import load_file

    root = Path(path)
    layouts = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
    for name in layouts:
        if not (root / name).is_file():
            continue
        files = (
            sorted(set(json.loads((root / name).read_text())["weight_map"].values()))
            if name.endswith(".index.json")
            else [name]
        )
        state: StateDict = {}
        for file in files:
            state.update(load_file(root / file) if file.endswith(".safetensors") else _torch_load(root / file))
        return state
    raise FileNotFoundError(f"no weights in {root}: looked for {', '.join(layouts)}")
