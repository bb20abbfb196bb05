"""The README documents every config key and every subcommand, and its test command is what CI runs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from minigpt4qwen.__main__ import build_parser
from minigpt4qwen.config import Config

ROOT = Path(__file__).resolve().parents[1]


def keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from keys(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_config_key_documented():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in keys(Config) if f"`{k}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"


def test_every_subcommand_documented_and_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    for name in sub.choices:
        assert f"minigpt4qwen {name}" in readme, name
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()
