"""Layers go one way: a module imports only modules below it (one module per layer), and torch stays above comm."""

from __future__ import annotations

import ast
import os

import dist_guardian

# One module per layer, bottom up: a module may import only modules listed before it, so the
# direction is checked between any two modules, also inside the stores and formats packages.
LAYERS = [
    # values, errors and names: no I/O
    "errors",
    "bulk",
    "_faults",
    "layout",
    "candidate",
    "policy",
    "tables",
    "manifest",
    # the native format and the foreign sniffers (torch-free)
    "formats.native",
    "formats.digests",
    "formats.writing",
    "formats.foreign",
    "formats.hf_layout",
    "formats",
    # the stores package, bottom up: the value and error translation, then calls, then operations
    "stores.base",
    "stores.errors",
    "stores.progress",
    "stores.local",
    "stores.deadline",
    "stores.s3",
    "stores.remote",
    "stores.reader",
    "stores.publish",
    "stores.ops",
    "stores",
    # planning on rank 0 and the save/mirror/retention side that needs no torch
    "config",
    "commit",
    "discovery",
    "fullcheck",
    "verify_foreign",
    "verify_hf",
    "verify",
    "journal",
    "planning",
    "copying",
    "retention",
    "mirror",
    "nodeshare",
    "hf_dirs",
    # torch from here on
    "comm",
    "geometry",
    "statetree",
    "sharding",
    "foreign_sanity",
    "staging",
    "sharded_io",
    "dcp_state",
    "foreign_dcp",
    "completeness",
    "foreign_loading",
    "hf_loading",
    "loading",
    "attempts",
    "coordinator",
    "save",
    "guardian",
    "bench",
    "cli",
    "__init__",
    # framework adapters: over the public API only, nothing above imports them (transformers, Lightning only there)
    "integrations",
    "integrations.hf",
    "integrations.lightning",
]
TORCH_FREE = set(LAYERS[: LAYERS.index("comm")]) | {"cli", "__init__"}


def _level(mod: str) -> int:
    if mod not in LAYERS:
        raise AssertionError(f"module {mod} is not placed in a layer: add it to LAYERS")
    return LAYERS.index(mod)


def _modules(root: str) -> list[tuple[str, str]]:
    """(module name relative to the package, file path): ``stores.base`` for ``stores/base.py``, ``stores`` for its
    ``__init__.py``; the top-level ``__init__`` keeps its name."""
    out = []
    for dirpath, _, files in os.walk(root):
        pkg = os.path.relpath(dirpath, root).replace(os.sep, ".")
        for name in files:
            if not name.endswith(".py"):
                continue
            mod = name[:-3]
            if pkg != ".":
                mod = pkg if mod == "__init__" else f"{pkg}.{mod}"
            out.append((mod, os.path.join(dirpath, name)))
    return sorted(out)


def _imports(path: str, mod: str) -> tuple[set[str], bool]:
    tree = ast.parse(open(path).read())
    ours, torch_top = set(), False
    # the package a relative import of ``mod`` starts from: "" at the top, "stores" inside stores/
    here = mod if path.endswith("__init__.py") and mod != "__init__" else mod.rpartition(".")[0]
    for node in tree.body:  # module-level imports only: lazy imports inside functions are deliberate
        if isinstance(node, ast.ImportFrom):
            if node.level >= 1:
                parts = here.split(".") if here else []
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                if node.module:
                    first = node.module.split(".")[0]
                    name = f"{base}.{first}" if base else first
                    # "from .stores.base import X" names the submodule; "from .stores import X" the package
                    sub = f"{name}.{node.module.split('.')[1]}" if "." in node.module else name
                    ours.add(sub if sub in LAYERS else name)
                else:
                    ours |= {f"{base}.{a.name}" if base else a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "torch":
                torch_top = True
        elif isinstance(node, ast.Import):
            torch_top |= any(a.name.split(".")[0] == "torch" for a in node.names)
    return ours, torch_top


def test_layers_go_one_way():
    root = os.path.dirname(dist_guardian.__file__)
    problems = []
    for mod, path in _modules(root):
        ours, torch_top = _imports(path, mod)
        for dep in ours - {mod}:
            if _level(dep) >= _level(mod):
                problems.append(f"{mod} (layer {_level(mod)}) imports {dep} (layer {_level(dep)})")
        if torch_top and mod in TORCH_FREE:
            problems.append(f"{mod} imports torch but must stay torch-free")
    assert not problems, problems


def test_cli_listing_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, dist_guardian.cli, dist_guardian.planning, dist_guardian.mirror; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_unsafe_torch_load_anywhere():
    root = os.path.dirname(dist_guardian.__file__)
    for name, path in _modules(root):
        assert "weights_only=False" not in open(path).read().replace(" ", ""), name


def test_every_module_has_a_layer_and_the_check_sees_direction():
    """Not vacuous: every module is placed, and an upward import between two neighbours would be caught."""
    root = os.path.dirname(dist_guardian.__file__)
    assert sorted(m for m, _ in _modules(root)) == sorted(LAYERS)
    assert _level("stores.local") < _level("stores.s3") and _level("loading") < _level("coordinator")
