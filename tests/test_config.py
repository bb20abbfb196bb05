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


def test_map_paths_reaches_every_path_field_and_leaves_names():
    from minigpt4qwen.config import map_paths, to_dict

    cfg = load_config(None, [
        "model.vision_checkpoint=v", "model.eva_checkpoint=e", "model.blip2_checkpoint=b", "model.qformer_init=q",
        "model.projector_checkpoint=p", "model.llm=l", "model.tokenizer=t", "data.train=[{path: a, image_root: i}]",
        "eval.heldout=[{path: h}]", "eval.mme_root=m", "train.output_dir=o", "engine.deepspeed_config=d",
    ])
    mapped = map_paths(cfg, lambda v: f"/x/{v}")

    def strings(node) -> list[str]:
        if isinstance(node, dict | list):
            return [s for v in (node.values() if isinstance(node, dict) else node) for s in strings(v)]
        return [node] if isinstance(node, str) else []

    assert sorted(s for s in strings(to_dict(mapped)) if s.startswith("/x/")) == [f"/x/{p}" for p in "abdehilmopqtv"]
    assert cfg.model.llm == "l" and cfg.data.train[0].path == "a"  # a copy: the original is untouched
    assert mapped.eval.heldout[0].image_root == ""  # empty = the annotation file's folder, not a path
    for name in ("smollm2", "random:tiny-qwen2"):  # LLM sources that are names
        assert map_paths(load_config(None, [f"model.llm={name}"]), lambda v: f"/x/{v}").model.llm == name


def test_relocate_applies_to_the_file_before_the_overrides(tmp_path):
    from minigpt4qwen.config import map_paths

    f = tmp_path / "c.yaml"
    f.write_text("eval:\n  mme_root: a\ntrain:\n  output_dir: r\n")
    cfg = load_config(f, ["train.output_dir=o"], relocate=lambda c: map_paths(c, lambda v: f"/base/{v}"))
    assert cfg.eval.mme_root == "/base/a" and cfg.train.output_dir == "o"


@pytest.mark.parametrize("override,message", [
    ("model.llm=random:nope", "model.llm: unknown preset random:nope; choose one of random:qwen-7b"),
    ("model.vision=nope", "model.vision: unknown preset 'nope'; choose one of eva-vit-g"),
    ("model.qformer=nope", "model.qformer: unknown preset 'nope'; choose one of blip2-qformer"),
])
def test_unknown_model_preset_is_one_error_line(tmp_path, capsys, override, message):
    """A misspelled preset stops the command with exit status 2 and one line naming the key, not a traceback."""
    from minigpt4qwen.__main__ import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {vision: tiny, qformer: tiny, llm: 'random:tiny-qwen2'}\n")
    assert main(["info", "--config", str(cfg), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
