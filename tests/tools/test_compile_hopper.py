"""Every Triton kernel, at every block configuration its launcher can pick, compiles for Hopper
(sm_90a) on this CPU machine, specialised exactly as the JIT specialises a launch (the real
launchers called on meta tensors, their launches captured). This catches what the interpreter lets
through (dtype rules, layouts, unsupported ops)."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import duo_fast.kernels as kernels_pkg

pytestmark = pytest.mark.slow

MODULES = sorted(m.name for m in pkgutil.iter_modules(kernels_pkg.__path__)
                 if m.name not in ("compile_check", "cost_model") and not m.name.startswith("_"))   # tools, helpers


def _jit_kernels(module: str) -> set[str]:
    """Names of the launchable ``@triton.jit`` kernels of a module (helpers excluded: ``_..._kernel``)."""
    mod = importlib.import_module(f"duo_fast.kernels.{module}")
    return {n for n in dir(mod) if n.startswith("_") and n.endswith("_kernel")}


def test_every_kernel_has_configurations():
    code = ("import json\nfrom duo_fast.tools.compile_check import configurations\n"
            "print(json.dumps(sorted({(m, k) for m, k, *_ in configurations()})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # capturing needs the JIT functions
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    covered = {tuple(pair) for pair in json.loads(out.stdout.strip().splitlines()[-1])}
    for module in MODULES:
        missing = {k for k in _jit_kernels(module) if (module, k) not in covered}
        assert not missing, f"kernels of {module} without a compile-check configuration: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_module_compiles_for_hopper(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the JIT reads it at import
    out = subprocess.run([sys.executable, "-m", "duo_fast.tools.compile_check", "--arch", "90", "--jobs", "2",
                          "--only", module], capture_output=True, text=True, env=env, timeout=1200)
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    assert " 0 failed, target sm_90a" in out.stdout and " 0 compiled" not in out.stdout
