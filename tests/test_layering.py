"""Layers go one way: a lower module never imports a higher one, and torch stays above comm."""

from __future__ import annotations

import ast
import os

import dist_guardian

LAYERS = [
    {"errors", "_faults"},
    {"candidate", "policy", "manifest"},
    {"formats"},
    {"stores"},
    {"discovery"},
    {"verify"},
    {"journal", "planning"},
    {"comm"},
    {"statetree", "staging", "foreign_loading", "loading", "attempts", "coordinator", "saving"},
    {"guardian"},
    {"cli", "bench", "__init__"},
]
TORCH_FREE = set().union(*LAYERS[:7]) | {"saving", "cli", "__init__"}


def _level(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        if mod in layer:
            return i
    raise AssertionError(f"module {mod} is not placed in a layer: add it to LAYERS")


def _imports(path: str) -> tuple[set[str], bool]:
    tree = ast.parse(open(path).read())
    ours, torch_top = set(), False
    for node in tree.body:  # module-level imports only: lazy imports inside functions are deliberate
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    ours.add(node.module.split(".")[0])
                else:
                    ours |= {a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "torch":
                torch_top = True
        elif isinstance(node, ast.Import):
            torch_top |= any(a.name.split(".")[0] == "torch" for a in node.names)
    return ours, torch_top


def test_layers_go_one_way():
    root = os.path.dirname(dist_guardian.__file__)
    problems = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        mod = name[:-3]
        ours, torch_top = _imports(os.path.join(root, name))
        for dep in ours:
            if _level(dep) > _level(mod):
                problems.append(f"{mod} (layer {_level(mod)}) imports {dep} (layer {_level(dep)})")
        if torch_top and mod in TORCH_FREE:
            problems.append(f"{mod} imports torch but must stay torch-free")
    assert not problems, problems


def test_cli_listing_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, dist_guardian.cli, dist_guardian.planning, dist_guardian.saving; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_unsafe_torch_load_anywhere():
    root = os.path.dirname(dist_guardian.__file__)
    for name in os.listdir(root):
        if name.endswith(".py"):
            assert "weights_only=False" not in open(os.path.join(root, name)).read().replace(" ", ""), name
