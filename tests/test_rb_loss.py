"""The Rao-Blackwellized NELBO: closed form vs direct form, its gradient, and the fp32 path."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from duo_fast import reference as ref
from duo_fast.ops import rb_loss


def _inputs(B, L, K, alpha, dtype=torch.float64, scale=3.0, per_token=False):
    logits = (torch.randn(B, L, K, dtype=torch.float64) * scale).to(dtype)
    x0 = torch.randint(0, K, (B, L))
    zt = torch.where(torch.rand(B, L) < 0.5, x0, torch.randint(0, K, (B, L)))
    zt[0, 0], x0[0, 0] = 1, 1            # both cases always present
    zt[0, 1], x0[0, 1] = 0, 1
    shape = (B, L) if per_token else (B,)
    a = torch.as_tensor(alpha, dtype=torch.float64).expand(shape).clone() if not callable(alpha) else alpha(shape)
    da = -torch.rand(shape, dtype=torch.float64) - 0.5
    return logits, zt, x0, a, da


@pytest.mark.parametrize("K", [2, 7, 100, 1000, 4099])
@pytest.mark.parametrize("per_token", [False, True])
def test_closed_form_equals_direct_float64(K, per_token):
    # alpha log-uniform in [1e-4, 1 - 1e-4] on both ends
    def alphas(shape):
        u = torch.rand(shape, dtype=torch.float64)
        lo = 10 ** (-4 + 3.7 * torch.rand(shape, dtype=torch.float64))
        return torch.where(u < 0.5, lo, 1 - lo)

    logits, zt, x0, a, da = _inputs(3, 17, K, alphas, per_token=per_token)
    closed = ref.rb_loss_ref(logits, zt, x0, a, da)
    direct = ref.rb_loss_direct_ref(logits, zt, x0, a, da)
    assert closed.shape == (3, 17)
    assert_close(closed, direct, atol=1e-10, rtol=1e-10, what=f"closed vs direct K={K}")
    assert (direct >= -1e-12).all()


@pytest.mark.parametrize("alpha", [1e-4, 0.2, 1 - 1e-4])
def test_closed_form_gradient_matches_autograd(alpha):
    logits, zt, x0, a, da = _inputs(2, 9, 50, alpha)
    g_out = torch.rand(2, 9, dtype=torch.float64)
    lg = logits.clone().requires_grad_()
    (ref.rb_loss_direct_ref(lg, zt, x0, a, da) * g_out).sum().backward()
    grad = ref.rb_loss_grad_ref(logits, zt, x0, a, da, g_out)
    assert_close(grad, lg.grad, atol=1e-9, rtol=1e-9, what="closed-form gradient")


@pytest.mark.parametrize("K", [7, 1000, 30522])
@pytest.mark.parametrize("alpha,tol", [(1e-4, 1e-4), (1e-3, 1e-5), (0.5, 1e-5), (1 - 1e-3, 1e-5), (1 - 1e-4, 1e-4)])
def test_fp32_path_against_float64(K, alpha, tol):
    B, L = (2, 8) if K > 10000 else (4, 33)
    logits, zt, x0, a, da = _inputs(B, L, K, alpha, dtype=torch.float32)
    truth = ref.rb_loss_direct_ref(logits.double(), zt, x0, a, da)
    got = rb_loss(logits, zt, x0, a, da)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # relative error of the per-sequence sums (single tokens can have losses near 0)
    err = ((got.double() - truth).sum(-1).abs() / truth.sum(-1).abs()).max().item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"
    # gradient through the fp32 path against the float64 autograd gradient
    lg = logits.clone().requires_grad_()
    rb_loss(lg, zt, x0, a, da).sum().backward()
    lg64 = logits.double().requires_grad_()
    ref.rb_loss_direct_ref(lg64, zt, x0, a, da).sum().backward()
    gerr = ((lg.grad.double() - lg64.grad).flatten(1).norm(dim=1) / lg64.grad.flatten(1).norm(dim=1)).max().item()
    assert gerr <= 1e-4, f"gradient relative error {gerr:.2e}"


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="must be"):
        rb_loss(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 0.5, -1.0)
