"""Regenerate the README's configuration reference from the dataclasses' field docstrings.

    .venv/bin/python scripts/config_table.py
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

from minigpt4qwen import config as C

ROOT = Path(__file__).resolve().parents[1]


def field_docs() -> dict[tuple[str, str], str]:
    docs = {}
    for node in ast.parse(Path(C.__file__).read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for st, nxt in zip(node.body, node.body[1:] + [None]):
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    doc = " ".join(str(nxt.value.value).split())
                docs[(node.name, st.target.id)] = doc
    return docs


def rows(cls, prefix: str, docs) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += rows(tp, f"{prefix}{f.name}.", docs)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = repr(default).replace("'", "")
        doc = docs.get((cls.__name__, f.name), '').replace('|', '\\|')  # a bare | would split the cell
        out.append(f"| `{prefix}{f.name}` | `{shown}` | {doc} |")
    return out


def main() -> None:
    table = "\n".join(["| key | default | meaning |", "|---|---|---|", *rows(C.Config, "", field_docs())])
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- config-table -->", "<!-- /config-table -->"
    new = f"{start}\n{table}\n{end}"
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    readme.write_text(text)


if __name__ == "__main__":
    main()
