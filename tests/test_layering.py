"""The core does not know its integrations: no module of ``horizonlm`` outside ``integrations/``
imports ``horizonlm.integrations``, at the top or inside a function. The command line
(``cli.py``) is the composition root, where the integrations are wired in."""

from __future__ import annotations

import ast
from pathlib import Path

import horizonlm

PACKAGE = Path(horizonlm.__file__).parent
COMPOSITION_ROOTS = {"cli.py"}


def _imported(tree: ast.AST, module: str) -> list[str]:
    """Every module an import statement anywhere in ``tree`` names (relative ones resolved)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_no_core_module_imports_an_integration() -> None:
    offenders, checked = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "integrations" or str(rel) in COMPOSITION_ROOTS:
            continue
        module = ".".join(("horizonlm", *rel.with_suffix("").parts))
        checked += 1
        for name in _imported(ast.parse(path.read_text(), str(path)), module):
            if name == "horizonlm.integrations" or name.startswith("horizonlm.integrations."):
                offenders.append(f"{rel} imports {name}")
    assert checked > 20
    assert not offenders, offenders


def test_the_check_sees_function_local_and_relative_imports() -> None:
    source = "def f():\n    from horizonlm.integrations.export import load_any\n" \
             "def g():\n    from .integrations import hf\n"
    found = _imported(ast.parse(source), "horizonlm.evaluate")
    assert "horizonlm.integrations.export" in found and "horizonlm.integrations.hf" in found
