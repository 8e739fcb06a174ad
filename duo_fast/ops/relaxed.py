"""The curriculum's relaxed input embedding and DCD's coupled latents (docs/math.md sections 5, 6),
without any ``B x L x K`` tensor.

``relaxed_embedding`` modes:

* ``dense``: exact ``h0 = softmax(w / tau) @ E`` and ``z_t = argmax w`` for Gaussian latents
  ``w = at e_x + st eps``; the noise is generated inside the kernel from ``seed`` and never stored.
* ``sparse``: the same, except that on the Triton path vocabulary tiles whose weights are all
  below ``1e-6 / K`` skip their embedding rows: the dropped weight per token is below 1e-6, so
  ``|h0 - exact| <= 1e-6 max_j |E_j|``. At the recipes' ``tau = 1e-3`` almost every tile is
  skipped and the cost is that of drawing the noise. The PyTorch path on CPU drops the same
  entries (below ``1e-6 / K``) and gathers the rest (see ``_RelaxedTorch``).
* ``topk``: the Duo++ relaxation (section 5) with the exact argmax rule: ``k`` order statistics
  of the noise drawn directly, O(k) per token, then an embedding bag.
* ``adaptive``: exact top-k (section 5): order statistics drawn until the rows not drawn carry
  at most ``tol`` (1e-6) of the largest kept weight, ``k`` chosen per token up to ``k_max``;
  exact argmax; an embedding bag over the kept rows (forward gather, backward scatter-add).
  ``stats`` receives the bound achieved.

Implementations: Triton kernels (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``) and a
PyTorch path for CPU that works on ``chunk_tokens`` tokens at a time. The backward gives
``d embedding`` only (no gradient flows to the noise, ``x0``, ``gamma`` or ``tau``) and regenerates
the noise from the seed: Triton with the same Philox counters, PyTorch by reseeding each chunk's
generator. Results are reproducible from ``seed`` on a given device and implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from duo_fast.core.hostsync import read_cpu
from duo_fast.core.noise_schedule import gaussian_coefficients, per_token
from duo_fast.ops.backends import run_impl, seed_from, use_triton
from duo_fast.ops.relaxed_torch import adaptive_topk_relaxation, coupled_argmax, topk_relaxation

__all__ = ["relaxed_embedding", "coupled_latents", "MODES", "adaptive_fits", "resolve_mode"]

MODES = ("dense", "sparse", "topk", "adaptive")
ADAPTIVE_TOL = 1e-6
ADAPTIVE_K_MAX = 32


def _chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 0x9E3779B97F4A7C15 + chunk) % (2**63))


def _chunk_latents(x0: Tensor, at: Tensor, st: Tensor, K: int, seed: int, chunk: int, eps: Tensor | None) -> Tensor:
    """w (n, K) float32 of one chunk of tokens: its own generator, or the explicit noise."""
    if eps is None:
        eps = torch.randn((x0.shape[0], K), generator=_chunk_generator(seed, chunk, x0.device), device=x0.device)
    w = st[:, None] * eps.float()
    w.scatter_add_(1, x0[:, None], at[:, None])
    return w


def _weights(w: Tensor, tau: float) -> Tensor:
    """softmax(w / tau), in place, from (w - max w) / tau: no rounding of w / tau at the scale 1/tau."""
    return torch.softmax(w.sub_(w.amax(-1, keepdim=True)).div_(tau), -1)


# The gather path is taken for a chunk whose significant weights are at most this fraction of
# its (n, K) entries (a dense matmul does ~16x more useful flops per second than a gather here),
# and the entries are kept for the backward while they take at most _KEEP_BYTES.
_GATHER_FRACTION = 1 / 16
_KEEP_BYTES = 64 * 2**20


def _significant(p: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """(rows, cols, weights) of the entries of the (n, K) weights above ``threshold``, or None when
    there are too many for a gather to beat the matmul (a host read: CPU path only)."""
    mask = p > threshold
    if read_cpu(mask.sum()) > _GATHER_FRACTION * p.numel():
        return None
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols, p[rows, cols]


class _RelaxedTorch(torch.autograd.Function):
    """Chunked PyTorch path. On CPU a chunk whose weights are almost all zero (small ``tau``) skips
    the matmul: ``h0`` is a gather of the rows with weight above ``threshold`` (0 in dense mode:
    only weights that are exactly 0 in float32 are skipped, which changes nothing but the order of
    the sum; ``sparse_delta(K)`` in sparse mode, as the kernels), and those (row, id, weight)
    entries are kept so that the backward is a scatter-add instead of regenerating the noise."""

    @staticmethod
    def forward(ctx, x0: Tensor, at: Tensor, st: Tensor, embedding: Tensor, tau: float, seed: int,
                eps: Tensor | None, chunk: int, threshold: float) -> tuple[Tensor, Tensor]:
        N = x0.shape[0]
        K, D = embedding.shape
        e32 = embedding.float()
        h0 = torch.empty((N, D), dtype=embedding.dtype, device=x0.device)
        zt = torch.empty(N, dtype=torch.int64, device=x0.device)
        kept: list[tuple[Tensor, Tensor, Tensor] | None] = []
        kept_bytes = 0
        for c, s in enumerate(range(0, N, chunk)):
            e = min(N, s + chunk)
            w = _chunk_latents(x0[s:e], at[s:e], st[s:e], K, seed, c, None if eps is None else eps[s:e])
            zt[s:e] = w.argmax(-1)
            p = _weights(w, tau)
            del w
            entries = _significant(p, threshold) if x0.device.type == "cpu" else None
            if entries is None:
                h0[s:e] = p @ e32
            else:
                rows, cols, wts = entries
                h0[s:e] = torch.zeros((e - s, D), device=x0.device).index_add_(0, rows, e32[cols] * wts[:, None])
                kept_bytes += rows.numel() * 20
                if kept_bytes > _KEEP_BYTES:
                    entries = None
            kept.append(entries)
        ctx.save_for_backward(x0, at, st, eps)
        ctx.kept = kept
        ctx.meta = (K, D, tau, seed, chunk, embedding.dtype, threshold)
        ctx.mark_non_differentiable(zt)
        return h0, zt

    @staticmethod
    def backward(ctx, dh: Tensor, _dzt: Tensor | None):
        x0, at, st, eps = ctx.saved_tensors
        K, D, tau, seed, chunk, dtype, threshold = ctx.meta
        de = torch.zeros((K, D), dtype=torch.float32, device=x0.device)
        N = x0.shape[0]
        for c, s in enumerate(range(0, N, chunk)):
            e = min(N, s + chunk)
            entries = ctx.kept[c]
            if entries is None:
                w = _chunk_latents(x0[s:e], at[s:e], st[s:e], K, seed, c, None if eps is None else eps[s:e])
                p = _weights(w, tau)
                del w
                entries = _significant(p, threshold) if x0.device.type == "cpu" else None
                if entries is None:
                    de.addmm_(p.t(), dh[s:e].float())
                    continue
            rows, cols, wts = entries
            de.index_add_(0, cols, dh[s:e].float()[rows] * wts[:, None])
        ctx.kept = None
        return None, None, None, de.to(dtype), None, None, None, None, None


class _RelaxedTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0: Tensor, at: Tensor, st: Tensor, embedding: Tensor, tau: float, seed: int,
                eps: Tensor | None, sparse: bool, ieee: bool) -> tuple[Tensor, Tensor]:
        from duo_fast.kernels.relaxed_embedding import relaxed_fwd

        h0, zt, norm = relaxed_fwd(x0, at, st, embedding.contiguous(), tau, seed, sparse, eps, ieee=ieee)
        ctx.save_for_backward(x0, at, st, norm, eps)
        ctx.meta = (embedding.shape[0], tau, seed, sparse, embedding.dtype, ieee)
        ctx.mark_non_differentiable(zt)
        return h0, zt

    @staticmethod
    def backward(ctx, dh: Tensor, _dzt: Tensor | None):
        from duo_fast.kernels.relaxed_embedding import relaxed_bwd

        x0, at, st, norm, eps = ctx.saved_tensors
        K, tau, seed, sparse, dtype, ieee = ctx.meta
        de = relaxed_bwd(x0, at, st, norm, dh.contiguous(), K, tau, seed, sparse, eps, ieee=ieee)
        return None, None, None, de.to(dtype), None, None, None, None, None


def _default_chunk(K: int) -> int:
    """Tokens per chunk of the PyTorch path: (chunk, K) float32 blocks of about 4 MiB."""
    return max(1, (4 * 2**20) // (4 * K))


def adaptive_fits(tau: float, K: int, gamma_max: float, tol: float = ADAPTIVE_TOL, k_max: int = ADAPTIVE_K_MAX) -> bool:
    """Whether the adaptive mode reaches ``tol`` within ``k_max`` rows for essentially every token
    (host arithmetic, no data). The draws stop once ``st (G_1 - G_k) >= Delta_w``,
    ``Delta_w = tau log((K - 1)/tol)``; given ``G_1 = g`` the others are iid N(0, 1) below ``g``, so
    the number within ``Delta = Delta_w / st`` of it is Binomial with mean about
    ``lam = (K - 1)(Phi(g) - Phi(g - Delta))``. Taken at the largest ``st`` (``gamma_max``) and at
    ``g`` = the 1e-6 lower quantile of ``G_1``, require ``lam + 6 sqrt(lam) + 6 <= k_max``."""
    import math

    from scipy.stats import norm

    st = math.sqrt(1.0 / (1.0 + math.exp(-gamma_max)))
    delta = tau * math.log((K - 1) / tol) / st
    g = norm.isf(-math.log(1e-6) / (K - 1)) if K > 15 else norm.ppf(1e-6 ** (1.0 / (K - 1)))
    lam = (K - 1) * (norm.cdf(g) - norm.cdf(g - delta))
    return lam + 6 * math.sqrt(lam) + 6 <= k_max


def resolve_mode(mode: str, tau: float, K: int, gamma_max: float) -> tuple[str, int]:
    """``(mode, k_max)``. ``auto``: ``adaptive`` with the smallest cap in (8, 16, 32) for which
    :func:`adaptive_fits` holds (the cheapest exact relaxation by the cost model; fewer columns,
    less embedding traffic), else ``sparse``; any other mode is returned as it is, with the
    default cap."""
    if mode != "auto":
        return mode, ADAPTIVE_K_MAX
    for cap in (8, 16, 32):
        if cap <= K - 1 and adaptive_fits(tau, K, gamma_max, k_max=cap):
            return "adaptive", cap
    return "sparse", ADAPTIVE_K_MAX


def relaxed_embedding(x0: Tensor, gamma: Tensor | float, tau: float, embedding: Tensor, seed: int | None = None,
                      mode: str = "sparse", k: int = 2, generator: torch.Generator | None = None,
                      eps: Tensor | None = None, impl: str = "auto",
                      chunk_tokens: int | None = None, tol: float = ADAPTIVE_TOL, k_max: int = ADAPTIVE_K_MAX,
                      stats: dict | None = None, ieee: bool = False) -> tuple[Tensor, Tensor]:
    """Relaxed input embedding of the curriculum (section 5).

    x0: (B, L) int64 in [0, K); gamma: scalar, (B,) or (B, L) (``at = sqrt(sigmoid(-gamma))``,
    ``st = sqrt(sigmoid(gamma))``); tau > 0; embedding: (K, D) fp32/bf16/fp16. ``seed`` keys the
    noise (drawn from ``generator`` when None). ``eps`` (B, L, K), test only: explicit noise
    replacing the RNG (dense and sparse). ``k``: rows kept by ``topk``. ``tol``, ``k_max``: the
    ``adaptive`` mode's bound on the weight of the rows not drawn (relative to the largest kept
    weight) and its cap on rows per token; with ``stats`` (a dict) it stores device tensors
    ``bound_max`` (largest bound achieved), ``k_mean``, ``k_max`` and ``capped`` (fraction of
    tokens that reached ``k_max`` above ``tol``; no host read). ``ieee``: the Triton dense/sparse
    path multiplies an fp32 embedding in exact fp32 (the FMA units) instead of bf16 tensor cores
    with fp32 accumulation (its default whatever the embedding's dtype); the PyTorch path always
    computes in the embedding's dtype.
    Returns ``h0`` (B, L, D) in the embedding's dtype (differentiable w.r.t. ``embedding``) and
    ``zt = argmax w`` (B, L) int64.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if x0.dim() != 2 or x0.dtype != torch.int64:
        raise ValueError(f"x0 must be (B, L) int64, got {tuple(x0.shape)} {x0.dtype}")
    if embedding.dim() != 2:
        raise ValueError(f"embedding must be (K, D), got {tuple(embedding.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    K, D = embedding.shape
    B, L = x0.shape
    torch._assert_async(((x0 >= 0) & (x0 < K)).all(), f"token ids out of range [0, {K})")
    g = per_token(gamma, x0).to(device=x0.device, dtype=torch.float64).expand(B, L)
    seed = seed_from(seed, generator)
    if mode == "adaptive":
        if eps is not None:
            raise ValueError("explicit eps is only supported by the dense and sparse modes")
        if not 1 <= k_max <= K - 1:
            raise ValueError(f"k_max must be in [1, K - 1] = [1, {K - 1}], got {k_max}")
        flat_x = x0.reshape(-1).contiguous()
        if use_triton(embedding, impl, "relaxed_embedding"):
            from duo_fast.kernels.relaxed_topk import adaptive_topk

            at, st = (t.float().reshape(-1).contiguous() for t in gaussian_coefficients(g))
            out = adaptive_topk(flat_x, at, st, K, float(tau), float(tol), k_max, seed)
        else:
            gen = torch.Generator(device=x0.device).manual_seed(seed)
            cpu = x0.device.type == "cpu"
            out = adaptive_topk_relaxation(flat_x, g.reshape(-1), tau, K, tol, k_max, generator=gen,
                                                   early_exit=cpu, pad=not cpu)
        h0 = torch.nn.functional.embedding_bag(out["ids"], embedding, per_sample_weights=out["weights"].to(embedding.dtype),
                                               mode="sum")
        if stats is not None:
            stats.update(bound_max=out["bound"].max(), k_mean=out["k"].double().mean(), k_max=out["k"].max(),
                         capped=(out["bound"] > tol).double().mean())
        return h0.view(B, L, D), out["zt"].view(B, L)
    if mode == "topk":
        if eps is not None:
            raise ValueError("explicit eps is only supported by the dense and sparse modes")
        gen = torch.Generator(device=x0.device).manual_seed(seed)
        idx, weights, zt = topk_relaxation(x0, g, tau, K, k, generator=gen)
        h0 = torch.nn.functional.embedding_bag(idx.reshape(B * L, k + 1), embedding,
                                               per_sample_weights=weights.reshape(B * L, k + 1).to(embedding.dtype),
                                               mode="sum")
        return h0.view(B, L, D), zt
    if eps is not None and eps.shape != (B, L, K):
        raise ValueError(f"eps must be (B, L, K) = {(B, L, K)}, got {tuple(eps.shape)}")
    at, st = (t.float().reshape(-1).contiguous() for t in gaussian_coefficients(g))
    flat_x = x0.reshape(-1).contiguous()
    flat_eps = None if eps is None else eps.reshape(B * L, K).float().contiguous()
    if use_triton(embedding, impl, "relaxed_embedding"):
        if ieee and embedding.dtype != torch.float32:
            raise ValueError(f"ieee=True needs an fp32 embedding, got {embedding.dtype}")
        h0, zt = _RelaxedTriton.apply(flat_x, at, st, embedding, float(tau), seed, flat_eps, mode == "sparse", ieee)
    else:
        threshold = 0.0 if mode == "dense" else 1e-6 / K
        h0, zt = _RelaxedTorch.apply(flat_x, at, st, embedding, float(tau), seed, flat_eps,
                                     chunk_tokens or _default_chunk(K), threshold)
    return h0.view(B, L, D), zt.view(B, L)


def coupled_latents(x0: Tensor, gamma_t: Tensor | float, gamma_s: Tensor | float, vocab_size: int,
                    seed: int | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """DCD's coupled discrete latents (section 6): ``z_t = argmax(at_t e_x + st_t eps)`` and
    ``z_s = argmax(at_s e_x + st_s eps)`` for one shared ``eps``, sampled exactly in O(1) per token
    from ``(eps_x, max_{j != x} eps_j, its argmax)`` on any device.
    x0: (B, L) int64; gamma_t, gamma_s: scalars, (B,) or (B, L). Returns (zt, zs), (B, L) int64."""
    if x0.dim() != 2 or x0.dtype != torch.int64:
        raise ValueError(f"x0 must be (B, L) int64, got {tuple(x0.shape)} {x0.dtype}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    torch._assert_async(((x0 >= 0) & (x0 < vocab_size)).all(), f"token ids out of range [0, {vocab_size})")
    run_impl("coupled_latents", x0)
    gen = torch.Generator(device=x0.device).manual_seed(seed_from(seed, generator))
    return coupled_argmax(x0, gamma_t, gamma_s, vocab_size, generator=gen)
