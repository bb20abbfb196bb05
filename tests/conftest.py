"""Shared fixtures: an autouse seed, the synthetic data set and a tiny trained run (random tiny LLM)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


TINY_OVERRIDES = [
    "model.vision=tiny", "model.qformer=tiny", "model.num_query_tokens=4", "model.llm=random:tiny-qwen2",
    "data.random_resized_crop=false", "data.hflip=false", "data.max_txt_len=96", "train.batch_size=4",
    "train.grad_accum=2", "train.lr=1e-3", "train.warmup_steps=2", "train.precision=fp32", "train.device=cpu",
]


def tiny_config(tmp: Path, data_dir: Path, *extra: str):
    from minigpt4qwen.config import load_config

    return load_config(None, [
        *TINY_OVERRIDES,
        f"data.train=[{{path: {data_dir / 'train_seed.json'}}}, {{path: {data_dir / 'train_llava.json'}}}]",
        f"train.output_dir={tmp / 'run'}",
        *extra,
    ])


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """The synthetic data set at small size (seed + LLaVA JSON, held-out, MME layout)."""
    from minigpt4qwen.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, n_train=48, n_heldout=12, n_mme=6, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shapes_data) -> Path:
    """A run directory trained for a few steps on the tiny model: what chat, web UI, API and eval load."""
    from minigpt4qwen.train.loop import train

    tmp = tmp_path_factory.mktemp("tinyrun")
    return train(tiny_config(tmp, shapes_data, "train.max_steps=4", "train.save_every_steps=2"))


@pytest.fixture
def wide_llm(monkeypatch) -> str:
    """`random:tiny-wide`: tiny-qwen2 with init std 0.2, whose greedy answers are words that depend on the image (0.02
    gives near-flat logits: greedy repeats one token); `tiny-wide-400` has no spare rows past the tokenizer's 400."""
    from minigpt4qwen.models.llm import LLM_PRESETS

    monkeypatch.setitem(LLM_PRESETS, "tiny-wide", dict(LLM_PRESETS["tiny-qwen2"], initializer_range=0.2))
    monkeypatch.setitem(LLM_PRESETS, "tiny-wide-400", dict(LLM_PRESETS["tiny-qwen2"], initializer_range=0.2,
                                                             vocab_size=400))
    return "model.llm=random:tiny-wide"


@pytest.fixture(scope="module")
def assistant(tiny_run):
    """The tiny run loaded for generation on CPU (API, scheduler and batching tests)."""
    from minigpt4qwen.serve.generate import Assistant

    return Assistant.from_run(tiny_run, device="cpu")
