"""Plain-PyTorch reference of the Duo math (docs/math.md sections 1-6).

This module is the oracle of every kernel test and the baseline of every benchmark. It is
written to be read: no kernels, no chunking, everything materialised, and float64-capable
(pass float64 tensors to get float64 results). Shapes follow docs/math.md: ``B`` batch, ``L``
length, ``K`` vocabulary, ``D`` hidden width. ``alpha`` arguments broadcast against the
token axes: a tensor of shape ``(B,)`` is one value per sequence, ``(B, L)`` one per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .hostsync import read_cpu

__all__ = [
    "alpha_loglinear", "alpha_cosine", "stratified_times", "sample_qt",
    "posterior_ref", "posterior_bayes_ref", "sample_posterior_dense_ref",
    "rb_loss_ref", "rb_loss_direct_ref", "rb_loss_grad_ref",
    "gaussian_coefficients", "gaussian_latents_ref", "relaxed_embedding_ref",
    "topk_order_statistics", "floyd_distinct", "topk_relaxation_ref",
    "coupled_argmax_dense_ref", "coupled_argmax_ref", "per_token", "exponential_from_bits", "exponential_draws",
]


def per_token(alpha: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-sequence ``(B,)`` or per-token ``(B, L)`` value against ``like`` (B, L)."""
    if isinstance(alpha, (float, int)):
        a = torch.tensor(float(alpha), dtype=torch.float64, device=like.device)   # keep Python floats exact
    else:
        a = torch.as_tensor(alpha, device=like.device)
    if a.dim() == 1 and like.dim() == 2:
        a = a[:, None]
    return a.expand(like.shape) if a.dim() > 0 else a


# ---------------------------------------------------------------------------------------------
# Section 1: schedules and the USDM marginal
# ---------------------------------------------------------------------------------------------

def alpha_loglinear(t: Tensor, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Log-linear schedule: ``alpha = 1 - (1 - eps) t``. Returns ``(alpha, dalpha/dt)``."""
    alpha = 1.0 - (1.0 - eps) * t
    return alpha, torch.full_like(t, -(1.0 - eps))


def alpha_cosine(t: Tensor, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Cosine schedule: ``alpha = 1 - cos(pi/2 (1 - t'))``, ``t' = (1 - eps) t``.

    Returns ``(alpha, dalpha/dt)``; the derivative is the exact one, i.e. it carries the
    chain-rule factor ``(1 - eps)`` of ``t'``.
    """
    u = 0.5 * math.pi * (1.0 - (1.0 - eps) * t)
    return 1.0 - torch.cos(u), -0.5 * math.pi * (1.0 - eps) * torch.sin(u)


def exponential_from_bits(r: Tensor, bits: int = 32) -> Tensor:
    """Exp(1) variates from uniform integers ``r`` in ``[0, 2^bits)`` by inversion, with full
    relative precision in both tails (docs/math.md, "Random draws"): the upper half of the
    integers gives ``-log(U)``, ``U = (m + 1/2) 2^-bits``, the lower half ``-log1p(-V)``, ``V`` the
    same from the other end, ``m < 2^(bits-1)`` exact. float32 result; the Triton kernels apply
    the same map to Philox words (``kernels._common.exponential32``)."""
    half = 1 << (bits - 1)
    up = r >= half
    x = torch.where(up, (1 << bits) - 1 - r, r).float().add_(0.5).mul_(2.0 ** -bits)
    out = torch.neg(x).log1p_()                      # the lower half: log1p(-x)
    return torch.where(up, x.log_(), out, out=out).neg_()   # the upper half: log(x); two float temporaries


def exponential_draws(shape: tuple[int, ...], generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> Tensor:
    """Exp(1) float32 draws of ``shape`` with exact tails: 31 random bits per draw (torch's
    ``random_`` on int32), range [2.3e-10, 22.2], so a Gumbel ``-log E`` spans 25.3 nats."""
    r = torch.empty(shape, dtype=torch.int32, device=device).random_(generator=generator)
    return exponential_from_bits(r, bits=31)


def stratified_times(n: int, *, eps: float = 1e-3, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     strata: int | None = None, first: int = 0) -> Tensor:
    """Antithetic times as the public trainer draws them (section 3): ``strata`` strata of
    ``[0, 1)`` (default ``n``), stratum ``k`` drawn as ``(u_k + k)/strata`` with its own uniform
    ``u_k``, mapped to ``[eps, 1]``; this call returns strata ``first .. first + n - 1``. A rank's
    micro-batch takes its slice of the global batch's strata (``first = (rank * accum + j) * n``).
    Shape ``(n,)``."""
    strata = n if strata is None else strata
    u = torch.rand((n,), generator=generator, device=device, dtype=dtype)
    t = ((u + torch.arange(first, first + n, device=device, dtype=dtype)) / strata) % 1.0
    return (1.0 - eps) * t + eps


def sample_qt(x: Tensor, alpha: Tensor | float, vocab_size: int,
              generator: torch.Generator | None = None) -> Tensor:
    """Draw ``z_t ~ q_t(. | x) = Cat(alpha e_x + (1 - alpha)/K)``: keep ``x`` with probability
    ``alpha``, else a uniform id over all ``K`` (which may be ``x``). ``x``: (B, L) int64."""
    a = per_token(alpha, x)
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64) < a
    uniform = torch.randint(0, vocab_size, x.shape, generator=generator, device=x.device)
    return torch.where(keep, x, uniform)


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

def gaussian_coefficients(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``(at, st) = (sqrt(sigmoid(-gamma)), sqrt(sigmoid(gamma)))`` (section 4)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


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


def _ndtri_upper(log_q: Tensor) -> Tensor:
    """``Phi^-1(exp(log_q))`` accurate when ``exp(log_q)`` is close to 1: ``-Phi^-1(-expm1(log_q))``."""
    return -torch.special.ndtri(-torch.expm1(log_q))


def topk_order_statistics(n: int, k: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu", u: Tensor | None = None) -> Tensor:
    """The top-``k`` order statistics ``G_1 > ... > G_k`` of ``n`` iid N(0, 1), drawn exactly
    from uniforms in log space (section 5). Returns ``shape + (k,)`` float64."""
    if u is None:
        u = torch.rand((*shape, k), generator=generator, device=device, dtype=torch.float64)
    log_phi = torch.zeros(shape, device=u.device, dtype=torch.float64)
    out = []
    for j in range(k):   # G_j = Phi^-1(Phi(G_{j-1}) U_j^(1/(n-j)))
        log_phi = log_phi + torch.log(u[..., j]) / (n - j)
        out.append(_ndtri_upper(log_phi))
    return torch.stack(out, -1)


def floyd_distinct(n: int, k: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """``k`` distinct uniform picks from ``range(n)`` per element (Floyd's algorithm), in the
    order they were drawn (uniformly random order). Returns ``shape + (k,)`` int64."""
    picks: list[Tensor] = []
    for j in range(n - k, n):
        t = torch.randint(0, j + 1, shape, generator=generator, device=device)
        if picks:
            taken = (torch.stack(picks, -1) == t[..., None]).any(-1)
            t = torch.where(taken, torch.full_like(t, j), t)
        picks.append(t)
    # Floyd's picks are a uniform subset; shuffle so that position carries no information.
    idx = torch.stack(picks, -1)
    perm = torch.rand(idx.shape, generator=generator, device=device).argsort(-1)
    return idx.gather(-1, perm)


def topk_relaxation_ref(x0: Tensor, gamma: Tensor, tau: float, vocab_size: int, k: int,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Duo++ top-k relaxation with the exact argmax rule (section 5), O(k) per token.

    x0: (B, L) int64; gamma: (B,) or (B, L). Returns ``(indices (B, L, k+1) int64,
    weights (B, L, k+1) float64, zt (B, L) int64)``: column 0 is ``x`` itself, columns 1..k
    the ids of ``G_1 > ... > G_k``. The weights are the exact softmax weights of these rows,
    normalised by a denominator that also counts the other ``K - 1 - k`` coordinates through
    their conditional expectation, so they sum to slightly less than 1; the embedding of those
    coordinates is not included (as in Duo++). ``zt = x`` iff ``w_x > st G_1``.
    """
    K = vocab_size
    if not 1 <= k <= K - 1:
        raise ValueError(f"top-k relaxation needs 1 <= k <= K - 1, got k={k}, K={K}")
    shape = tuple(x0.shape)
    at, st = gaussian_coefficients(per_token(gamma, x0).double())
    G = topk_order_statistics(K - 1, k, shape, generator=generator, device=x0.device)   # (B, L, k)
    others = floyd_distinct(K - 1, k, shape, generator=generator, device=x0.device)
    others = others + (others >= x0[..., None]).long()                                  # skip x
    eps_x = torch.randn(shape, generator=generator, device=x0.device, dtype=torch.float64)
    w_x = at + st * eps_x
    w_top = st[..., None] * G
    scores = torch.cat([w_x[..., None], w_top], -1) / tau                                # (B, L, k+1)
    # The rest: count * E[exp(X/tau) | X < c], X ~ N(0, st^2), c = st G_k.
    count = K - 1 - k
    c = w_top[..., -1]
    log_rest = (st ** 2 / (2 * tau ** 2) + torch.special.log_ndtr((c - st ** 2 / tau) / st)
                - torch.special.log_ndtr(c / st))
    if count > 0:
        log_rest = log_rest + math.log(count)
        log_z = torch.logsumexp(torch.cat([scores, log_rest[..., None]], -1), -1)
    else:
        log_z = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - log_z[..., None])
    zt = torch.where(w_x > w_top[..., 0], x0, others[..., 0])
    return torch.cat([x0[..., None], others], -1), weights, zt


def adaptive_topk_relaxation_ref(x0: Tensor, gamma: Tensor, tau: float, vocab_size: int, tol: float = 1e-6,
                                 k_max: int = 32, generator: torch.Generator | None = None,
                                 early_exit: bool = False, pad: bool = True) -> dict[str, Tensor]:
    """Adaptive exact top-k relaxation (section 5), O(k) per token, float64.

    Per token: ``w_x = at + st eps_x``; the order statistics ``G_1 > G_2 > ...`` of the other
    ``K - 1`` coordinates are drawn one at a time until every coordinate not drawn is provably
    negligible: after ``k`` draws the ``K - 1 - k`` others lie below ``st G_k``, so their total
    softmax weight relative to the largest kept one is at most
    ``bound_k = (K - 1 - k) exp((st G_k - w_max) / tau)``, ``w_max = max(w_x, st G_1)``. ``k`` is
    the first with ``bound_k <= tol`` (or ``k_max``, then the bound is what it is). The kept rows'
    weights are the softmax over them: each differs from the exact dense weight by at most a
    factor ``1 + bound``. ``zt = x`` iff ``w_x > st G_1`` (the exact argmax). The ids of
    ``G_1..G_k`` are uniformly random distinct ids other than ``x``, in random order.

    x0: (B, L) int64; gamma: (B,) or (B, L). Returns a dict of ``ids`` (B, L, 1 + k_max) int64
    (column 0 is ``x``; unused columns repeat ``x``), ``weights`` (same shape, float64, 0 where
    unused, rows sum to 1), ``w`` (the latents of the kept rows, -inf where unused), ``zt``
    (B, L), ``k`` (B, L) int64 and ``bound`` (B, L) float64. ``early_exit``: stop drawing when
    every token is done (a host read; CPU only); ``pad=False`` then returns only the columns
    drawn (``1 + max k``).
    """
    K = vocab_size
    if not 1 <= k_max <= K - 1:
        raise ValueError(f"adaptive top-k needs 1 <= k_max <= K - 1, got k_max={k_max}, K={K}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    shape, dev = tuple(x0.shape), x0.device
    at, st = gaussian_coefficients(per_token(gamma, x0).to(device=dev, dtype=torch.float64).expand(shape))
    w_x = at + st * torch.randn(shape, generator=generator, device=dev, dtype=torch.float64)
    cols = [w_x]
    log_phi = torch.zeros(shape, device=dev, dtype=torch.float64)
    k = torch.full(shape, k_max, dtype=torch.int64, device=dev)
    bound = torch.zeros(shape, device=dev, dtype=torch.float64)
    done = torch.zeros(shape, dtype=torch.bool, device=dev)
    w_max = w_x
    for j in range(k_max):              # draw G_{j+1}: Phi(G_{j+1}) = Phi(G_j) U^(1/(K-1-j))
        log_phi = log_phi - exponential_draws(shape, generator=generator, device=dev).double() / (K - 1 - j)
        w_j = st * _ndtri_upper(log_phi)
        if j == 0:
            w_max = torch.maximum(w_x, w_j)
        cols.append(torch.where(done, float("-inf"), w_j))
        b = (K - 2 - j) * torch.exp((w_j - w_max) / tau)
        newly = ~done & ((b <= tol) | (j == k_max - 1))
        k = torch.where(newly, j + 1, k)
        bound = torch.where(newly, b, bound)
        done = done | newly
        if early_exit and dev.type == "cpu" and read_cpu(done.all()):
            break
    n_drawn = len(cols) - 1
    w = torch.stack(cols, -1)                                                   # (B, L, 1 + n_drawn)
    weights = torch.softmax(w / tau, -1) if n_drawn else torch.ones_like(w)
    picks = floyd_distinct(K - 1, n_drawn, shape, generator=generator, device=dev)
    picks = picks + (picks >= x0[..., None]).long()                            # skip x
    ids = torch.cat([x0[..., None], picks], -1)
    used = w > float("-inf")
    ids = torch.where(used, ids, x0[..., None])
    zt = torch.where(w_x > w[..., 1], x0, ids[..., 1])
    pad = k_max - n_drawn if pad else 0
    if pad:
        ids = torch.cat([ids, x0[..., None].expand(*shape, pad)], -1)
        weights = torch.cat([weights, weights.new_zeros(*shape, pad)], -1)
        w = torch.cat([w, w.new_full((*shape, pad), float("-inf"))], -1)
    return {"ids": ids, "weights": weights, "w": w, "zt": zt, "k": k, "bound": bound}


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


def coupled_argmax_ref(x0: Tensor, gamma_t: Tensor, gamma_s: Tensor, vocab_size: int,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Exact O(1) coupled sampler (section 6): from ``(eps_x, M, j*)`` only, never a K-vector.
    x0: (B, L) int64; gamma_t, gamma_s: (B,) or (B, L). Returns (zt, zs), each (B, L) int64."""
    K = vocab_size
    shape = tuple(x0.shape)
    eps_x = torch.randn(shape, generator=generator, device=x0.device, dtype=torch.float64)
    u = torch.rand(shape, generator=generator, device=x0.device, dtype=torch.float64)
    m = _ndtri_upper(torch.log(u) / (K - 1))        # max of K - 1 iid N(0, 1)
    j = torch.randint(0, K - 1, shape, generator=generator, device=x0.device)
    j = j + (j >= x0).long()
    mu_t = torch.exp(-per_token(gamma_t, x0).double() / 2)
    mu_s = torch.exp(-per_token(gamma_s, x0).double() / 2)
    zt = torch.where(eps_x + mu_t > m, x0, j)
    zs = torch.where(eps_x + mu_s > m, x0, j)
    return zt, zs
