"""scripts/gpu_scale.py's FLOP accounting (what its MFU column divides by), checked against the Qwen-7B shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_scale():
    spec = importlib.util.spec_from_file_location("gpu_scale", ROOT / "scripts" / "gpu_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_counts_6n_for_full_training_and_4n_for_lora():
    mfu = _gpu_scale().mfu
    width, inter, layers, vocab = 4096, 11008, 32, 151936
    n = layers * (4 * width * width + 3 * width * inter) + vocab * width  # decoder Linears + lm_head: 7.0e9
    full, lora = mfu(1000.0, False, 989.0), mfu(1000.0, False, 989.0, frozen_base=True)
    assert full["flop_per_token"] - lora["flop_per_token"] == 2 * n  # no weight gradient of the frozen base
    attention = full["flop_per_token"] - 6 * n
    assert attention == lora["flop_per_token"] - 4 * n > 0  # attention's FLOPs do not depend on what trains
    assert full["mfu"] == round(1000.0 * full["flop_per_token"] / 989e12, 3)
    assert (full["flop_accounting"], lora["flop_accounting"]) == ("6N", "4N (LoRA)")
    recompute = mfu(1000.0, True, 989.0)
    assert recompute["mfu"] == full["mfu"] and recompute["hfu_with_recompute"] > full["hfu_with_recompute"]
