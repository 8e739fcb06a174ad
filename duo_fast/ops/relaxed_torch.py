"""The PyTorch paths of the O(k) relaxations and of DCD's coupled latents (docs/math.md sections
5 and 6): the order statistics of the noise drawn directly, never a ``K``-vector per token.
``ops.relaxed`` runs them where the Triton kernels do not; the dense oracles they are tested
against are ``duo_fast.reference.relaxed_embedding_ref`` and ``coupled_argmax_dense_ref``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from duo_fast.core.draws import exponential_draws
from duo_fast.core.hostsync import read_cpu
from duo_fast.core.noise_schedule import gaussian_coefficients, per_token

__all__ = ["topk_order_statistics", "floyd_distinct", "topk_relaxation", "adaptive_topk_relaxation",
           "coupled_argmax"]


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


def topk_relaxation(x0: Tensor, gamma: Tensor, tau: float, vocab_size: int, k: int,
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


def adaptive_topk_relaxation(x0: Tensor, gamma: Tensor, tau: float, vocab_size: int, tol: float = 1e-6,
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


def coupled_argmax(x0: Tensor, gamma_t: Tensor, gamma_s: Tensor, vocab_size: int,
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
