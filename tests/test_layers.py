"""The layering of the package (docs/architecture.md), checked on the source so that it cannot
rot: each subpackage imports only the layers below it, nothing imports in a circle, no
production module imports the oracle ``duo_fast.reference``, ``kernels/`` imports nothing of
duo_fast, and the repository root shadows no installed package."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers it may import (besides itself); "duo_fast" is the package's __init__
ALLOWED = {
    "core": set(),
    "kernels": set(),
    "csrc": set(),
    "reference": {"core"},
    "ops": {"core", "kernels"},
    "model": {"core", "ops"},
    "data": {"core"},
    "io": {"core", "model"},
    "sampling": {"core", "ops", "model"},
    "environment": {"core", "ops", "model"},
    "eval": {"core", "ops", "model", "data", "io", "sampling"},
    "training": {"core", "ops", "model", "data", "io", "sampling", "eval", "environment"},
    "tools": {"core", "kernels", "ops", "model"},
    "bench": {"core", "kernels", "ops", "model", "data", "io", "sampling", "eval", "training", "environment",
              "tools", "reference"},
    "cli": {"core", "ops", "model", "data", "io", "sampling", "eval", "training", "environment", "bench"},
    "duo_fast": {"ops", "io", "sampling", "training"},
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for the installed layout (kernels/ and csrc/ as duo_fast.kernels/.csrc)."""
    out = {}
    for base, pkg in ((ROOT / "duo_fast", "duo_fast"), (ROOT / "kernels", "duo_fast.kernels"),
                      (ROOT / "csrc", "duo_fast.csrc")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "duo_fast"


def _imports(module: str, path: Path, top_level_only: bool = False) -> set[str]:
    """The duo_fast modules ``module`` imports (relative imports resolved; ``from X import Y``
    counts X.Y when that is a module). ``top_level_only``: only those run at import time."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    known = _modules()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("duo_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("duo_fast"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known or a.name == "_C"}
            found |= subs
            if len(subs) < len(node.names):             # names of the module itself, not only its submodules
                found.add(target)
    return {m for m in found if m != module}


def test_every_layer_imports_only_the_layers_below_it():
    bad = []
    for module, path in sorted(_modules().items()):
        src = _layer(module)
        for target in sorted(_imports(module, path)):
            dst = _layer(target)
            if dst != src and dst not in ALLOWED[src] and not (target == "duo_fast._C" and src == "ops"):
                bad.append(f"{module} imports {target} ({src} -> {dst})")
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)


def test_no_production_module_imports_the_reference():
    users = sorted(m for m, p in _modules().items()
                   if "duo_fast.reference" in _imports(m, p) and _layer(m) not in ("bench", "reference"))
    assert not users, f"production modules import the test oracle duo_fast.reference: {users}"


def test_kernels_import_nothing_of_duo_fast():
    for f in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.startswith("duo_fast") for n in names), f"{f.name} imports {names}"


def test_no_import_circle():
    """No cycle among the imports that run at import time (lazy imports inside functions may
    point upward only where the layering allows, which the test above checks)."""
    mods = _modules()
    graph = {m: {t for t in _imports(m, p, top_level_only=True) if t in mods} for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1 and not m.startswith(t + "."):       # a package importing its own module is fine
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_layer_check_sees_a_planted_upward_import(tmp_path, monkeypatch):
    planted = tmp_path / "planted.py"
    planted.write_text("from duo_fast.training.duo import train\nfrom duo_fast import reference as ref\n")
    found = _imports("duo_fast.ops.planted", planted)
    assert "duo_fast.training.duo" in found and "duo_fast.reference" in found
    assert _layer("duo_fast.training.duo") not in ALLOWED["ops"]


def test_the_repository_root_shadows_no_installed_package():
    """From the repository root (where ``python -m duo_fast.cli`` runs) transformers still finds
    the installed ``kernels`` package its GPT-2 import needs, and ``duo-fast env`` runs."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import duo_fast, transformers\nfrom transformers import GPT2LMHeadModel\nimport kernels, os\n"
            "assert os.path.dirname(os.path.abspath(kernels.__file__)) != os.path.abspath('kernels'), kernels.__file__\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "duo_fast.cli", "env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "backends:" in proc.stdout, proc.stderr[-2000:]
