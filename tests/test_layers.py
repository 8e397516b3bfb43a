"""Layering: no module imports a layer above its own (static scan of every import, including
imports inside functions), so the architecture in ARCHITECTURE.md stays true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kbrouter"
UPPER = ("policies", "engine", "eval", "train", "cli")
RULES: dict[str, tuple[str, ...]] = {
    "types.py": ("kb", "encoders", "models", "routing", "reading", *UPPER),
    "errors.py": ("kb", "encoders", "models", "routing", "reading", *UPPER),
    "files.py": ("kb", "encoders", "models", "routing", "reading", *UPPER),
    "config.py": ("kb", "models", "routing", "reading", *UPPER),
    "encoders": ("kb", "models", "routing", "reading", *UPPER),
    "kb": ("models", "routing", "reading", *UPPER),
    "models": ("kb", "routing", "reading", *UPPER),
    "reading": ("kb", "models", "routing", *UPPER),
    "routing": UPPER,
    "policies": ("engine", "eval", "train", "cli"),
    "engine": ("eval", "train", "cli"),
    "eval": ("train", "cli"),
    "train": ("cli",),
    "serve": ("cli", "train"),
    "testing.py": ("cli",),
}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.startswith("kbrouter.")}


@pytest.mark.parametrize("part", sorted(RULES))
def test_no_layer_imports_one_above_it(part: str):
    files = [SRC / part] if part.endswith(".py") else sorted((SRC / part).rglob("*.py"))
    forbidden = tuple(f"kbrouter.{p}" for p in RULES[part])
    bad = {
        f"{f.relative_to(SRC)} imports {m}"
        for f in files
        for m in _imports(f)
        if m.startswith(forbidden)
    }
    assert not bad, sorted(bad)
