"""The operator T (section 4): quadrature, interpolation, derivative, persistence, errors."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy import integrate, special

from duo_fast import TTable
from duo_fast.ops.ttable import p_and_derivative


def quad_p(gamma: float, K: int) -> float:
    """``int phi(z - mu) Phi(z)^(K-1) dz`` by adaptive quadrature, as written in section 4."""
    mu = math.exp(-gamma / 2)
    z0 = -special.ndtri(1.0 / K)                     # where Phi^(K-1) rises
    f = lambda z: math.exp(-0.5 * (z - mu) ** 2 - 0.5 * math.log(2 * math.pi) + (K - 1) * special.log_ndtr(z))
    lo, hi = min(mu, z0) - 12, max(mu, z0) + 12
    return integrate.quad(f, lo, hi, points=sorted({mu, z0 - 1, z0, z0 + 1}), epsabs=1e-14, epsrel=1e-13,
                          limit=1000)[0]


def quad_dp(gamma: float, K: int) -> float:
    """``dp/dgamma = -(mu/2) int phi(z - mu) (K-1) phi(z) Phi(z)^(K-2) dz``: section 4's
    ``(-mu/2) int (z - mu) phi(z - mu) Phi^(K-1) dz`` integrated by parts, which has no
    cancellation, so adaptive quadrature reaches a relative accuracy of 1e-12 everywhere."""
    mu = math.exp(-gamma / 2)
    z0 = -special.ndtri(1.0 / K)
    f = lambda z: math.exp(-0.5 * (z - mu) ** 2 - 0.5 * z * z - math.log(2 * math.pi) + math.log(K - 1)
                           + (K - 2) * special.log_ndtr(z))
    lo, hi = min(mu, z0) - 12, max(mu, z0) + 12
    return -(mu / 2) * integrate.quad(f, lo, hi, points=sorted({mu, z0 - 1, z0, z0 + 1, (mu + z0) / 2}),
                                      epsabs=0, epsrel=1e-13, limit=1000)[0]


def quad_dp_as_written(gamma: float, K: int) -> float:
    mu = math.exp(-gamma / 2)
    f = lambda z: (z - mu) * math.exp(-0.5 * (z - mu) ** 2 - 0.5 * math.log(2 * math.pi) + (K - 1) * special.log_ndtr(z))
    return (-mu / 2) * integrate.quad(f, mu - 14, mu + 14, points=[mu, 0, 2, 4], epsabs=1e-15, limit=1000)[0]


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("K", [100, 30522, 50257])
def test_table_against_quad(K):
    t0 = time.perf_counter()
    table = TTable.build(K, -5.0, -1.0, 100_000, cache=False)
    seconds = time.perf_counter() - t0
    print(f"TTable.build(K={K}, 1e5 points): {seconds:.1f} s")
    if K == 50257:
        assert seconds < 30, f"building the table took {seconds:.1f} s"
    rng = np.random.default_rng(K)
    gammas = rng.uniform(-5.0, -1.0, 50)
    alpha, dalpha = table.alpha_and_derivative(torch.tensor(gammas))
    scale = K / (K - 1)
    for g, a, d in zip(gammas, alpha.tolist(), dalpha.tolist()):
        a_ref = (K * quad_p(g, K) - 1) / (K - 1)
        d_ref = scale * quad_dp(g, K)
        assert abs(a - a_ref) <= 1e-9, f"alpha({g}) = {a}, quad {a_ref}"
        assert abs(d - d_ref) <= 1e-7 * abs(d_ref), f"dalpha({g}) = {d}, quad {d_ref}"
        assert abs(d - scale * quad_dp_as_written(g, K)) <= 1e-9   # the formula exactly as written


def test_facts_of_the_spec():
    p, _ = p_and_derivative(np.array([-5.0, -1.0]), 50257)
    assert abs(p[0] - 1.0) < 1e-12 and abs(p[1] - 0.0062072) < 2e-6
    p, _ = p_and_derivative(np.array([-4.0, 6.0]), 30522)
    assert abs(p[0] - 0.99906) < 1e-5 and abs(p[1] - 4.017e-5) / 4.017e-5 < 1e-3


def test_autograd_gives_the_analytic_derivative():
    table = TTable.build(1000, -5.0, -1.0, 20_001)
    g = torch.linspace(-4.9, -1.1, 37, dtype=torch.float64, requires_grad=True)
    alpha = table.alpha(g)
    (grad,) = torch.autograd.grad(alpha.sum(), g)
    _, dalpha = table.alpha_and_derivative(g.detach())
    assert torch.equal(grad, dalpha)
    assert (dalpha < 0).all() and (alpha.diff() < 0).all()
    # and the derivative is the derivative of the interpolant: central differences agree
    h = 1e-6
    fd = (table.alpha(g.detach() + h) - table.alpha(g.detach() - h)) / (2 * h)
    assert torch.allclose(fd, dalpha, rtol=1e-6, atol=1e-9)


def test_float32_queries_and_grid_points():
    table = TTable.build(500, -5.0, -1.0, 1001)
    grid = torch.linspace(-5.0, -1.0, 1001, dtype=torch.float64)
    p, _ = p_and_derivative(grid.numpy(), 500)
    a64, _ = table.alpha_and_derivative(grid)
    assert torch.allclose(a64, torch.from_numpy((500 * p - 1) / 499), atol=1e-14, rtol=0)
    a32, _ = table.alpha_and_derivative(grid.float())
    assert a32.dtype == torch.float32 and torch.allclose(a32.double(), a64, atol=1e-6)


def test_save_load_and_cache(tmp_path):
    table = TTable.build(300, -4.0, -2.0, 5000, cache=False)
    table.save(tmp_path / "t.npz")
    back = TTable.load(tmp_path / "t.npz")
    assert (back.vocab_size, back.gamma_min, back.gamma_max, back.num_points) == (300, -4.0, -2.0, 5000)
    g = torch.rand(100, dtype=torch.float64) * 2 - 4
    assert torch.equal(back.alpha(g), table.alpha(g))
    a = TTable.build(301, -4.0, -2.0, 5000, cache_dir=tmp_path)
    assert TTable.build(301, -4.0, -2.0, 5000, cache_dir=tmp_path) is a           # memory cache
    assert any(p.name.startswith("T_K301") for p in tmp_path.iterdir())           # disk cache
    TTable._memory.clear()
    b = TTable.build(301, -4.0, -2.0, 5000, cache_dir=tmp_path)                   # read from disk
    assert b is not a and torch.equal(b.q(), a.q())


def test_corrupt_file_is_an_error(tmp_path):
    TTable.build(50, -4.0, -2.0, 100, cache=False).save(tmp_path / "t.npz")
    z = dict(np.load(tmp_path / "t.npz"))
    z["q"] = z["q"][:-1]
    np.savez(tmp_path / "bad.npz", **z)
    with pytest.raises(ValueError, match="corrupt"):
        TTable.load(tmp_path / "bad.npz")


def test_out_of_range_and_vocab_errors():
    table = TTable.build(100, -4.0, -2.0, 1000)
    with pytest.raises(RuntimeError, match="outside the T table's range"):
        table.alpha(torch.tensor([-3.0, -1.5]))
    with pytest.raises(RuntimeError, match="outside the T table's range"):
        table.alpha(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="vocab_size=100"):
        table.check_vocab(101)
