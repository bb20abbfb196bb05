"""Config: YAML + dotted overrides into typed dataclasses; unknown or ill-typed keys fail with the key's name."""

from __future__ import annotations

import pytest

from minigpt4qwen.config import ConfigError, load_config


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n  epochs: 3\ndata:\n  train:\n    - {path: a.json, image_root: imgs}\n")
    cfg = load_config(f, ["train.lr=3e-4", "model.trainable.llm=full", "data.hflip=false", "train.betas=[0.9, 0.95]"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float) and cfg.train.epochs == 3
    assert cfg.model.trainable.llm == "full" and cfg.data.hflip is False and cfg.train.betas == [0.9, 0.95]
    assert cfg.data.train[0].path == "a.json" and cfg.data.train[0].image_root == "imgs"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("train.epochs=two", "key 'train.epochs': expected int"),
        ("train.epochs=1.5", "key 'train.epochs': expected int"),
        ("data.hflip=3", "key 'data.hflip': expected bool"),
        ("model.trainable.vision=lora", "vision must be one of"),
        ("data.on_bad_sample=ignore", "on_bad_sample must be error or skip"),
        ("bogus.x=1", "unknown config key 'bogus'"),
        ("data.train=[{image_root: x}]", "path"),
    ],
)
def test_bad_keys_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  visoin: eva-vit-g\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.visoin'"):
        load_config(f)


def test_shipped_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("*.yaml")) + sorted((root / "src/minigpt4qwen/configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)
        assert f.read_text().startswith("#"), f"{f} must start with the command that uses it"
