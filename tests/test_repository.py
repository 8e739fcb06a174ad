"""The repository stands on its own: nothing points outside it, every section the code cites
exists in docs/math.md, and the package top level exports the small public API."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".sh", ".toml", ".cpp", ".h", ".cu", ".json", ".cfg", ".txt")


def _files() -> list[Path]:
    out = []
    for folder in ("duo_fast", "kernels", "csrc", "bench", "tests", "docs", ".ci"):
        out += [p for p in (ROOT / folder).rglob("*") if p.is_file() and (p.suffix in TEXT or p.name == "run")]
    return out + [ROOT / "README.md", ROOT / "Makefile", ROOT / "setup.py"]


def test_nothing_points_outside_the_repository():
    needle = "../" + "shared"                      # built here so that this file does not match itself
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _files()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if needle in line]
    assert not hits, hits


def test_every_cited_math_section_exists():
    sections = {int(m.group(1)) for m in re.finditer(r"^## (\d+)\.", (ROOT / "docs" / "math.md").read_text(), re.M)}
    cited = set()
    for p in _files():
        for m in re.finditer(r"docs/math\.md,? sections? (\d+)(?:\s*(?:-|–|,|and)\s*(\d+))?", p.read_text(errors="replace")):
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            cited |= set(range(lo, hi + 1))
    assert cited and cited <= sections, sorted(cited - sections)


def test_the_public_api_is_small_and_documented():
    import duo_fast

    expected = {"load_pretrained", "generate", "SamplerConfig", "TTable", "rb_loss", "rb_loss_linear",
                "relaxed_embedding", "coupled_latents", "sample_posterior", "sample_posterior_linear", "train",
                "TrainConfig", "ops", "__version__"}
    assert set(duo_fast.__all__) == expected
    for name in expected - {"__version__", "ops"}:
        obj = getattr(duo_fast, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
    assert duo_fast.ops.rb_loss is duo_fast.rb_loss


def test_setup_installs_every_subpackage():
    """A new subpackage of duo_fast must be listed in setup.py, or a non-editable install lacks it."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "packages")
    found = {"duo_fast." + ".".join(p.parent.relative_to(ROOT / "duo_fast").parts)
             for p in (ROOT / "duo_fast").rglob("__init__.py") if p.parent != ROOT / "duo_fast"}
    assert found | {"duo_fast", "duo_fast.kernels", "duo_fast.csrc"} == set(listed), sorted(set(listed) ^ found)
