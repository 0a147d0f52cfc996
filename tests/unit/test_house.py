"""The house rules, measured: small modules, classes and functions in the package (issue 11).

No module of ``dist_guardian/`` over 500 lines, no class over 300, no function over 80 lines
or over 8 parameters (``self``/``cls`` not counted; ``*args`` and ``**kwargs`` count one each).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import repo_paths

PKG = Path(repo_paths.PACKAGE_DIR)
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES, MAX_PARAMS = 500, 300, 80, 8


def measure(pkg: Path = PKG) -> list[str]:
    """Every place over a limit, as ``path:name what``."""
    over: list[str] = []
    for path in sorted(pkg.rglob("*.py")):
        src = path.read_text(encoding="utf-8")
        rel = os.path.relpath(path, pkg.parent)
        if len(src.splitlines()) > MAX_MODULE_LINES:
            over.append(f"{rel} {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src, filename=str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                over.append(f"{rel}:{node.name} class of {node.end_lineno - node.lineno + 1} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                a = node.args
                params = [p for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                n = len(params) + (a.vararg is not None) + (a.kwarg is not None)
                if lines > MAX_FUNCTION_LINES:
                    over.append(f"{rel}:{node.name} function of {lines} lines")
                if n > MAX_PARAMS:
                    over.append(f"{rel}:{node.name} takes {n} parameters")
    return over


measure.__test__ = False  # a helper, not a test


def test_no_module_class_or_function_over_the_house_limits():
    assert measure() == []


def test_the_measure_sees_what_is_over(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (pkg / "big.py").write_text(f"def long(a, b, c, d, e, f, g, h, *rest):\n{body}\n" + "y = 1\n" * 420)
    assert measure(pkg) == [
        "pkg/big.py 506 lines",
        "pkg/big.py:long function of 86 lines",
        "pkg/big.py:long takes 9 parameters",
    ]
