"""Plain-PyTorch reference of the Duo math (docs/math.md sections 1-6).

This module is the oracle of every kernel and operator test and the baseline of the benchmarks;
no production module imports it (``tests/test_layers.py`` enforces that). The schedules and
draws it shares with production live in ``duo_fast.core`` and are re-exported here. It is
written to be read: no kernels, no chunking, everything materialised, and float64-capable
(pass float64 tensors to get float64 results). Shapes follow docs/math.md: ``B`` batch, ``L``
length, ``K`` vocabulary, ``D`` hidden width. ``alpha`` arguments broadcast against the
token axes: a tensor of shape ``(B,)`` is one value per sequence, ``(B, L)`` one per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from duo_fast.core.draws import exponential_draws, exponential_from_bits, sample_qt, stratified_times
from duo_fast.core.noise_schedule import alpha_cosine, alpha_loglinear, gaussian_coefficients, per_token

__all__ = [
    "alpha_loglinear", "alpha_cosine", "stratified_times", "sample_qt",
    "posterior_ref", "posterior_bayes_ref", "sample_posterior_dense_ref",
    "rb_loss_ref", "rb_loss_direct_ref", "rb_loss_grad_ref",
    "gaussian_coefficients", "gaussian_latents_ref", "relaxed_embedding_ref",
    "coupled_argmax_dense_ref", "per_token", "exponential_from_bits", "exponential_draws",
]


# ---------------------------------------------------------------------------------------------
# Section 2: the reverse posterior
# ---------------------------------------------------------------------------------------------

def posterior_ref(x_theta: Tensor, zt: Tensor, alpha_s: Tensor | float, alpha_t: Tensor | float) -> Tensor:
    """Dense ``q(z_s | z_t, x_theta)`` over the vocabulary (section 2).

    x_theta: (B, L, K) probabilities; zt: (B, L) int64; alphas (B,), (B, L) or scalars with
    ``alpha_s >= alpha_t``. Returns (B, L, K) in the dtype of ``x_theta``; rows sum to 1.
    """
    K = x_theta.shape[-1]
    a_t = per_token(alpha_t, zt).to(x_theta.dtype)[..., None]
    a_s = per_token(alpha_s, zt).to(x_theta.dtype)[..., None]
    a_ts = a_t / a_s
    at_i = torch.nn.functional.one_hot(zt, K).to(x_theta.dtype)
    x_i = x_theta.gather(-1, zt[..., None])
    numer = (a_t * K * x_theta * at_i + (a_ts - a_t) * at_i + (a_s - a_t) * x_theta
             + (1 - a_ts) * (1 - a_s) / K)
    return numer / (a_t * K * x_i + 1 - a_t)


def posterior_bayes_ref(x_theta: Tensor, zt: Tensor, alpha_s: float, alpha_t: float) -> Tensor:
    """Brute-force Bayes' rule ``q(z_t | z_s) q(z_s | x) / sum`` with the transition
    ``a_ts e_{z_s} + (1 - a_ts)/K``; the test oracle of :func:`posterior_ref`. Scalars only."""
    K = x_theta.shape[-1]
    a_ts = alpha_t / alpha_s
    trans = a_ts * torch.eye(K, dtype=x_theta.dtype) + (1 - a_ts) / K   # trans[k, i] = q(z_t=i | z_s=k)
    prior = alpha_s * x_theta + (1 - alpha_s) / K                        # q(z_s = k | x)
    like = trans[:, zt].movedim(0, -1)                                   # (..., K): q(z_t | z_s = k)
    joint = like * prior
    return joint / joint.sum(-1, keepdim=True)


def sample_posterior_dense_ref(logits: Tensor, zt: Tensor, alpha_s: Tensor | float, alpha_t: Tensor | float,
                               generator: torch.Generator | None = None) -> Tensor:
    """What the public sampler does: float64 dense posterior, full-size Gumbel noise, argmax.
    logits: (B, L, K); returns z_s (B, L) int64."""
    x_theta = logits.double().softmax(-1)
    q = posterior_ref(x_theta, zt, per_token(alpha_s, zt).double(), per_token(alpha_t, zt).double())
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (q.log() + gumbel).argmax(-1)


# ---------------------------------------------------------------------------------------------
# Section 3: the Rao-Blackwellized NELBO
# ---------------------------------------------------------------------------------------------

def rb_loss_direct_ref(logits: Tensor, zt: Tensor, x0: Tensor, alpha_t: Tensor | float,
                       dalpha_t: Tensor | float) -> Tensor:
    """Per-token USDM NELBO in the direct form (materialises ``e_x``). Returns (B, L)."""
    K = logits.shape[-1]
    a = per_token(alpha_t, zt).to(logits.dtype)[..., None]
    da = per_token(dalpha_t, zt).to(logits.dtype)
    p = logits.softmax(-1)
    ex = torch.nn.functional.one_hot(x0, K).to(logits.dtype)
    xbar = K * a * ex + (1 - a)
    xbar_th = K * a * p + (1 - a)
    xbar_i = xbar.gather(-1, zt[..., None])
    xbar_th_i = xbar_th.gather(-1, zt[..., None])
    inner = (K / xbar_i - K / xbar_th_i
             - ((xbar / xbar_i) * torch.log(xbar_th_i * xbar / (xbar_th * xbar_i))).sum(-1, keepdim=True))
    return (da / (K * a[..., 0])) * inner[..., 0]


def rb_loss_ref(logits: Tensor, zt: Tensor, x0: Tensor, alpha_t: Tensor | float,
                dalpha_t: Tensor | float) -> Tensor:
    """Per-token USDM NELBO in the Rao-Blackwellized closed form (section 3), evaluated
    naively in the dtype of ``logits`` (use float64 for a reference value).

    logits: (B, L, K) float; zt, x0: (B, L) int64; alpha_t, dalpha_t: (B,) or (B, L).
    Returns (B, L), non-negative.
    """
    K = logits.shape[-1]
    dt = logits.dtype
    a = per_token(alpha_t, zt).to(dt)
    da = per_token(dalpha_t, zt).to(dt)
    p = logits.softmax(-1)
    xbar_th = K * a[..., None] * p + (1 - a[..., None])
    s_log = xbar_th.log().sum(-1)
    xth_i = xbar_th.gather(-1, zt[..., None])[..., 0]
    xth_x = xbar_th.gather(-1, x0[..., None])[..., 0]
    eq = (zt == x0).to(dt)
    ne = 1 - eq
    c = (1 - a) / (K * a + 1 - a)
    xbar_i = (1 - a) + K * a * eq
    term1 = K * (1 / xbar_i - 1 / xth_i)
    c2 = torch.where(eq > 0, c, torch.ones_like(c))
    offset = ((K - 1) * c * eq - ne / c) * torch.log(c)
    term2 = (-c2 * (s_log - K * torch.log(xth_i))
             - ne * (K * a / (1 - a)) * (torch.log(xth_x) - torch.log(xth_i)) + offset)
    return da / (K * a) * (term1 - term2)


def rb_loss_grad_ref(logits: Tensor, zt: Tensor, x0: Tensor, alpha_t: Tensor | float,
                     dalpha_t: Tensor | float, grad_out: Tensor | None = None) -> Tensor:
    """Closed-form ``d loss / d logits`` (section 3), (B, L, K); ``grad_out`` (B, L) upstream."""
    K = logits.shape[-1]
    dt = logits.dtype
    a = per_token(alpha_t, zt).to(dt)
    da = per_token(dalpha_t, zt).to(dt)
    g = da / (K * a) * (grad_out.to(dt) if grad_out is not None else 1.0)
    p = logits.softmax(-1)
    xth = K * a[..., None] * p + (1 - a[..., None])
    p_i = p.gather(-1, zt[..., None])[..., 0]
    p_x = p.gather(-1, x0[..., None])[..., 0]
    xth_i = xth.gather(-1, zt[..., None])[..., 0]
    xth_x = xth.gather(-1, x0[..., None])[..., 0]
    S = (p / xth).sum(-1)
    r_i = K * a * p_i / xth_i
    r_x = K * a * p_x / xth_x
    beta = K * a / (1 - a)
    eq = (zt == x0).to(dt)
    ne = 1 - eq
    c = (1 - a) / (K * a + 1 - a)
    c2 = torch.where(eq > 0, c, torch.ones_like(c))
    coef_p = -K * r_i / xth_i - c2 * K * a * S + c2 * K * r_i + ne * beta * (r_i - r_x)
    grad = (c2 * K * a)[..., None] * p / xth + coef_p[..., None] * p
    grad = grad.scatter_add(-1, zt[..., None], (K * r_i / xth_i - c2 * K * r_i - ne * beta * r_i)[..., None])
    grad = grad.scatter_add(-1, x0[..., None], (ne * beta * r_x)[..., None])
    return g[..., None] * grad


# ---------------------------------------------------------------------------------------------
# Sections 4-5: Gaussian latents and their relaxations
# ---------------------------------------------------------------------------------------------

def gaussian_latents_ref(x0: Tensor, gamma: Tensor, vocab_size: int, eps: Tensor | None = None,
                         generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``w = at e_x + st eps`` of shape (B, L, K); ``gamma`` (B,) or (B, L); ``eps`` optional (B, L, K)."""
    if eps is None:
        eps = torch.randn((*x0.shape, vocab_size), generator=generator, device=x0.device, dtype=dtype)
    at, st = gaussian_coefficients(per_token(gamma, x0).to(eps.dtype))
    w = st[..., None] * eps
    return w.scatter_add(-1, x0[..., None], at[..., None].expand(*x0.shape, 1).contiguous())


def relaxed_embedding_ref(x0: Tensor, gamma: Tensor, tau: float, embedding: Tensor,
                          eps: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Exact dense relaxation (section 5): ``h0 = softmax(w / tau) @ E`` and ``zt = argmax w``.

    x0: (B, L) int64; gamma: (B,) or (B, L); embedding E: (K, D); eps: optional (B, L, K).
    Returns h0 (B, L, D) in E's dtype (computed in the wider of E's and eps' dtypes) and zt (B, L).
    """
    K = embedding.shape[0]
    dt = torch.promote_types(embedding.dtype, eps.dtype if eps is not None else torch.float32)
    w = gaussian_latents_ref(x0, gamma, K, eps=None if eps is None else eps.to(dt), generator=generator, dtype=dt)
    weights = torch.softmax(w / tau, dim=-1)
    h0 = weights @ embedding.to(dt)
    return h0.to(embedding.dtype), w.argmax(-1)


# ---------------------------------------------------------------------------------------------
# Section 6: the coupled argmax of DCD
# ---------------------------------------------------------------------------------------------

def coupled_argmax_dense_ref(x0: Tensor, gamma_t: Tensor, gamma_s: Tensor, vocab_size: int,
                             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Brute force: one dense ``eps`` (B, L, K), ``z = argmax(a e_x + s eps)`` at both times."""
    eps = torch.randn((*x0.shape, vocab_size), generator=generator, device=x0.device, dtype=torch.float64)
    zt = gaussian_latents_ref(x0, per_token(gamma_t, x0).double(), vocab_size, eps=eps).argmax(-1)
    zs = gaussian_latents_ref(x0, per_token(gamma_s, x0).double(), vocab_size, eps=eps).argmax(-1)
    return zt, zs


