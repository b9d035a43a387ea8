"""Layers import downwards only: flmcore ← operators ← growth ← stages.

Every import in every file of the four packages is read with ``ast`` (function-level
imports too, so a cycle cannot hide inside a function), and each must name a package at
or below the importing one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["flmcore", "operators", "growth", "stages"]  # bottom first


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for rank, package in enumerate(LAYERS):
        for path in sorted((root / package).rglob("*.py")):
            for line, target in imported_packages(path):
                if target in LAYERS and LAYERS.index(target) > rank:
                    bad.append(f"{path.relative_to(root)}:{line} imports {target}")
    return bad


def test_no_package_imports_upward():
    assert all((ROOT / p / "__init__.py").is_file() for p in LAYERS)
    assert upward_imports() == []


def test_the_check_sees_function_level_imports(tmp_path):
    """The checker itself: an upward import inside a function is found."""
    for package in LAYERS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "operators" / "bad.py").write_text(
        "import torch\nfrom flmcore import errors\n\ndef f():\n    from growth.config import X\n")
    assert upward_imports(tmp_path) == ["operators/bad.py:5 imports growth"]


def test_hf_names_are_spelled_out_once():
    """The Llama parameter names appear in code only in the bottom table (flmcore/params.py);
    docstrings and comments may quote them."""
    needles = ("q_proj.weight", "gate_proj.weight", "input_layernorm.weight", "down_proj.weight")
    found = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "flmcore" / "params.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                          and n.body and isinstance(n.body[0], ast.Expr)
                          and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and id(node) not in docstrings and any(k in node.value for k in needles)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
