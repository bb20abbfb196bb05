"""The package's layers, read from the import statements (function-level imports included): each part imports only
the parts below it, so serve and eval stand beside train, not on top of it, and nothing imports in a cycle.

    config  <-  data  <-  models  <-  runs  <-  train | serve  <-  eval (uses serve's generation)
                                                     tools on top: bench, demo, convert_cli, __main__
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import minigpt4qwen

ROOT = Path(minigpt4qwen.__file__).parent
BELOW = {
    "config": set(),
    "data": {"config"},
    "models": {"config", "data"},
    "runs": {"config", "data", "models"},
    "train": {"config", "data", "models", "runs"},
    "serve": {"config", "data", "models", "runs"},
    "eval": {"config", "data", "models", "runs", "serve"},
}
TOOLS = {"bench", "demo", "convert_cli", "__main__", "__init__"}


def imports() -> dict[str, set[str]]:
    """{part: parts it imports}; a part is a subpackage or a top-level module of minigpt4qwen."""
    edges: dict[str, set[str]] = defaultdict(set)
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        part, pkg = rel.with_suffix("").parts[0], list(rel.parent.parts)
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [node.names[0].name])
            elif node.module and node.module.startswith("minigpt4qwen."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target and target[0] != part:
                edges[part].add(target[0])
    return edges


def test_every_part_imports_only_parts_below_it():
    edges = imports()
    assert set(edges) - set(BELOW) <= TOOLS  # no unknown part: a new one must be placed in BELOW
    for part, allowed in BELOW.items():
        assert edges.get(part, set()) <= allowed, f"{part} imports {sorted(edges[part] - allowed)}"

