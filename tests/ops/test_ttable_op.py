"""The C++ T-table lookup op (csrc/): equality with the PyTorch fallback, accuracy, opcheck,
torch.compile, the CUDA source's compile for sm_90, and errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ttable import quad_dp, quad_p

from duo_fast import TTable
from duo_fast.ops import backend
from duo_fast.ops import extension as _ext
from duo_fast.ops.ttable import lookup_backend

ROOT = Path(__file__).resolve().parents[2]
needs_ext = pytest.mark.skipif(not _ext.AVAILABLE, reason=f"duo_fast._C not built: {_ext.IMPORT_ERROR}")


def test_extension_is_built():
    if os.environ.get("DUO_FAST_SKIP_EXT") == "1":
        pytest.skip("DUO_FAST_SKIP_EXT=1")
    assert _ext.AVAILABLE, f"make test builds duo_fast._C, but it did not import: {_ext.IMPORT_ERROR}"
    assert backend("cpu")["ttable_lookup"] == "cpp"


@pytest.fixture(scope="module")
def table() -> TTable:
    return TTable.build(50257, -5.0, -1.0, 100_000)


@needs_ext
def test_op_equals_fallback_on_a_million_points(table):
    g = torch.empty(1_000_000, dtype=torch.float64).uniform_(-5.0, -1.0)
    g[:100_000] = torch.linspace(-5.0, -1.0, 100_000, dtype=torch.float64)       # grid points, ends included
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-6)]:
        gg = g.to(dtype)
        a_op, d_op = table.alpha_and_derivative(gg, impl="cpp")
        a_pt, d_pt = table.alpha_and_derivative(gg, impl="torch")
        assert a_op.dtype == dtype and d_op.dtype == dtype
        assert (a_op - a_pt).abs().max().item() <= tol
        assert ((d_op - d_pt).abs() / d_pt.abs().clamp_min(1.0)).max().item() <= tol


@needs_ext
def test_op_interpolation_against_quad(table):
    gammas = np.random.default_rng(7).uniform(-5.0, -1.0, 50)
    alpha, dalpha = table.alpha_and_derivative(torch.tensor(gammas), impl="cpp")
    K = 50257
    for g, a, d in zip(gammas, alpha.tolist(), dalpha.tolist()):
        assert abs(a - (K * quad_p(g, K) - 1) / (K - 1)) <= 1e-9
        d_ref = K / (K - 1) * quad_dp(g, K)
        assert abs(d - d_ref) <= 1e-7 * abs(d_ref)


@needs_ext
def test_opcheck(table):
    g = (torch.rand(33, dtype=torch.float64) * 4 - 5).requires_grad_()
    for x in (g, g.detach().float().reshape(3, 11), g.detach()[::2]):
        torch.library.opcheck(torch.ops.duo_fast.ttable_lookup.default,
                              (x, table.q(), table.dq(), table.gamma_min, table.gamma_max, table.vocab_size))


@needs_ext
def test_autograd_through_the_op(table):
    g = (torch.rand(20, dtype=torch.float64) * 4 - 5).requires_grad_()
    (grad,) = torch.autograd.grad(table.alpha(g, impl="cpp").sum(), g)
    assert torch.equal(grad, table.alpha_and_derivative(g.detach(), impl="cpp")[1])


def test_compile_fullgraph(table):
    f = torch.compile(lambda g: table.alpha(g) * 2.0 + 1.0, fullgraph=True, backend="aot_eager")
    g = torch.rand(16, dtype=torch.float64) * 3 - 4.5
    assert torch.allclose(f(g), table.alpha(g) * 2.0 + 1.0, rtol=0, atol=1e-15)


@needs_ext
def test_op_input_errors(table):
    g = torch.tensor([-3.0])
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.duo_fast.ttable_lookup(g, table.q().float(), table.dq().float(), -5.0, -1.0, 50257)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.duo_fast.ttable_lookup(g.long(), table.q(), table.dq(), -5.0, -1.0, 50257)
    with pytest.raises(RuntimeError, match="gamma_min < gamma_max"):
        torch.ops.duo_fast.ttable_lookup(g, table.q(), table.dq(), -1.0, -5.0, 50257)
    a, _ = table.alpha_and_derivative(torch.tensor([-6.0, float("nan")]), check=False, impl="cpp")
    assert torch.isnan(a).all()                        # unchecked entry: NaN, never a clamp


def test_checked_entry_point_errors(table):
    with pytest.raises(RuntimeError, match="outside the T table's range"):
        table.alpha(torch.tensor([-0.5]))
    with pytest.raises(ValueError, match="vocab_size=50257"):
        table.check_vocab(50258)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_ext, "AVAILABLE", False)
    monkeypatch.setattr(_ext, "_warned", False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert lookup_backend(torch.device("cpu")) == "torch"
        assert lookup_backend(torch.device("cpu")) == "torch"
    assert len([x for x in w if "pure-PyTorch" in str(x.message)]) == 1
    with pytest.raises(RuntimeError, match="not available"):
        lookup_backend(torch.device("cpu"), "cpp")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_for_sm90(tmp_path):
    out = subprocess.run(["nvcc", "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "-c",
                          str(ROOT / "csrc" / "ttable_lookup_kernel.cu"), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


def test_the_op_compiles_on_first_use_when_not_prebuilt(tmp_path):
    """An install whose build could not see torch (pip install . with build isolation) has no
    duo_fast._C: the op is compiled from the installed sources on first use, said in one line,
    cached, and gives the prebuilt op's values; a second process loads the cache silently."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['duo_fast._C'] = None\n"
            "import torch, duo_fast\n"
            "from duo_fast.ops import extension as _ext\n"
            "from duo_fast.ops.ttable import lookup_backend\n"
            "assert _ext.SOURCE == 'jit', (_ext.SOURCE, _ext.IMPORT_ERROR)\n"
            "assert lookup_backend(torch.device('cpu')) == 'cpp'\n"
            "t = duo_fast.TTable.build(1000)\n"
            "print(repr(float(t.alpha(torch.tensor([-2.0], dtype=torch.float64))[0])))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DUO_FAST_CACHE"] = str(tmp_path)
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "compiling the C++ T-table op" in first.stderr and any((tmp_path / "torch_extensions").rglob("*.so"))
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0 and "compiling" not in second.stderr
    from duo_fast import TTable

    want = float(TTable.build(1000).alpha(torch.tensor([-2.0], dtype=torch.float64))[0])
    assert float(first.stdout.strip()) == float(second.stdout.strip()) == want
