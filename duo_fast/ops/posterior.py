"""Exact posterior sampling as a three-part mixture (docs/math.md section 2).

``q(z_s | z_t, x_theta)`` is a mixture of "draw from x_theta" (weight ``A = a_s - a_t``),
"draw uniformly" (``Bu = (a_s - a_t)(1 - a_s)/a_s``) and "stay at z_t"
(``C = a_t K x_theta[z_t] + a_t (1 - a_s)/a_s``): the section's ``(1 - a_ts)(1 - a_s)`` and
``a_ts - a_t`` without cancellation. Only ``x_theta[z_t]`` needs normalised probabilities; the
draw from ``x_theta`` is a Gumbel-argmax over the logits. The Psi sampler
``kappa q + (1 - kappa)(a_s q0 + (1 - a_s)/K)`` (``q0``: the posterior at ``s = 0``) is the same
three parts with other weights. No float64 ``B x L x K`` posterior is ever built.

Implementations: the Triton kernels of ``duo_fast.kernels.sample_posterior`` (one streaming pass
over the vocabulary, CUDA tensors or the interpreter) and the PyTorch path below (CPU), which
works on ``chunk_tokens`` rows at a time so its temporaries stay ``chunk_tokens x K``. They draw
from the same distribution with different random streams.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from duo_fast.core.draws import exponential_draws
from duo_fast.ops.backends import seed_from, token_rows, use_triton

__all__ = ["sample_posterior", "sample_posterior_linear", "nucleus_filter", "mixture_weights", "NUCLEUS_METHOD",
           "StepKind", "STEP_KINDS"]


class StepKind(enum.IntEnum):
    """The kind of a draw: the posterior at ``(alpha_s, alpha_t)``, or a final step at ``t_min``
    (``ANCESTRAL``: the posterior with ``alpha_s = 1``; ``GREEDY``: the argmax of the logits).
    The values are the Triton kernels' ``FINAL`` constants (``kernels.sample_posterior``)."""

    POSTERIOR = 0
    ANCESTRAL = 1
    GREEDY = 2


# the ``final=`` argument of the public operators -> the kind of draw
STEP_KINDS = {None: StepKind.POSTERIOR, "ancestral": StepKind.ANCESTRAL, "greedy": StepKind.GREEDY}


def nucleus_filter(logits: Tensor, top_p: float) -> Tensor:
    """Logits outside the nucleus set to -inf. The public rule (an id is kept when the mass
    sorted before it is <= ``top_p``; the most likely id always stays; mass accumulated in
    float64), made independent of how a sort orders ties: an id is kept when the mass of the ids
    with strictly larger logits is <= ``top_p``. The PyTorch path: a sort over the vocabulary
    (the Triton path finds the same cut without one, ``kernels.sample_posterior.nucleus_cut_fwd``).
    (..., K) -> (..., K) fp32."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if top_p >= 1:
        return logits
    sorted_logits = logits.sort(-1, descending=True).values
    cum = sorted_logits.double().softmax(-1).cumsum(-1)
    n_keep = 1 + (cum[..., :-1] <= top_p).sum(-1, keepdim=True)   # the cumulative mass is increasing
    cut = sorted_logits.gather(-1, n_keep - 1)
    return logits.masked_fill(logits < cut, float("-inf"))


NUCLEUS_METHOD = {"torch": "sort (float64 cumulative mass)", "triton": "cut by bisection over float32 order keys, no sort"}


def mixture_weights(x_i: Tensor, a_s: Tensor, a_t: Tensor, K: int, kappa: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(P(draw from x_theta), P(draw uniformly)); P(stay at z_t) is the rest. Float64 inputs."""
    A = a_s - a_t
    Bu = (a_s - a_t) / a_s * (1 - a_s)
    C = a_t * K * x_i + a_t * (1 - a_s) / a_s
    Z = A + Bu + C
    w_model, w_unif = A / Z, Bu / Z
    if kappa is not None:
        z0 = (1 - a_t) + a_t * K * x_i
        w_model = kappa * w_model + (1 - kappa) * a_s * (1 - a_t) / z0
        w_unif = kappa * w_unif + (1 - kappa) * (1 - a_s)
    return w_model, w_unif


def _kernel_seed(seed: int | Tensor | None, generator: torch.Generator | None) -> int | Tensor:
    return seed if isinstance(seed, Tensor) else seed_from(seed, generator)


def _check(logits_shape: torch.Size, zt: Tensor, final: str | None) -> None:
    if final not in STEP_KINDS:
        raise ValueError(f"final must be one of {tuple(STEP_KINDS)}, got {final!r}")
    if len(logits_shape) != 3 or zt.shape != logits_shape[:2]:
        raise ValueError(f"need (B, L, K) scores and zt (B, L); got {tuple(logits_shape)}, {tuple(zt.shape)}")


def _sample_rows(logits: Tensor, zt: Tensor, a_s: Tensor, a_t: Tensor, kappa: Tensor | None,
                 generator: torch.Generator | None, kind: StepKind) -> Tensor:
    """One chunk of rows: logits (n, K), zt (n,), a_s/a_t/kappa (n,) float64 -> (n,) int64."""
    if kind == StepKind.GREEDY:
        return logits.argmax(-1)
    K = logits.shape[-1]
    logits = logits.float()
    if kind == StepKind.ANCESTRAL:
        a_s = torch.ones_like(a_t)
    lse = torch.logsumexp(logits, -1)
    x_i = torch.exp(logits.gather(-1, zt[..., None])[..., 0] - lse).double()
    w_model, w_unif = mixture_weights(x_i, a_s, a_t, K, kappa)
    u = torch.rand(zt.shape, generator=generator, device=zt.device, dtype=torch.float64)
    e = exponential_draws(tuple(logits.shape), generator=generator, device=logits.device)
    draw_model = e.log_().neg_().add_(logits).argmax(-1)     # Gumbel-max with exact tails (-log of an Exp(1))
    draw_uniform = torch.randint(0, K, zt.shape, generator=generator, device=zt.device)
    return torch.where(u < w_model, draw_model, torch.where(u < w_model + w_unif, draw_uniform, zt))


def sample_posterior(logits: Tensor, zt: Tensor, alpha_s: Tensor | float, alpha_t: Tensor | float,
                     seed: int | Tensor | None = None, generator: torch.Generator | None = None, final: str | None = None,
                     top_p: float = 1.0, kappa: Tensor | float | None = None, impl: str = "auto",
                     chunk_tokens: int = 256) -> Tensor:
    """Draw ``z_s ~ q(z_s | z_t, x_theta)``, ``x_theta = softmax(logits)`` (its nucleus
    renormalisation when ``top_p < 1``; the Psi mixture when ``kappa`` is given).

    logits: (B, L, K) fp32/bf16/fp16; zt: (B, L) int64; alpha_s >= alpha_t and kappa: (B,),
    (B, L) or scalars. ``final='ancestral'`` uses ``alpha_s = 1``; ``final='greedy'`` returns
    ``argmax logits``. Randomness: ``generator`` (PyTorch path) or ``seed`` (Triton kernels; drawn
    from ``generator`` when not given). ``seed`` may be a one-element int64 tensor on the logits'
    device, read by the kernel: CUDA-graph replays then draw fresh noise. Returns (B, L) int64.
    """
    _check(logits.shape, zt, final)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    kind = STEP_KINDS[final]
    nucleus = top_p < 1 and kind != StepKind.GREEDY
    B, L, K = logits.shape
    a_s, a_t, kap = token_rows(alpha_s, zt), token_rows(alpha_t, zt), token_rows(kappa, zt)
    if use_triton(logits, impl, "sample_posterior"):
        from duo_fast.kernels.sample_posterior import nucleus_cut_fwd, sample_posterior_fwd

        flat = logits.reshape(B * L, K).contiguous()
        cut = nucleus_cut_fwd(flat, top_p) if nucleus else None
        out = sample_posterior_fwd(flat, zt.reshape(-1).contiguous(), a_s, a_t, kap, _kernel_seed(seed, generator), int(kind),
                                   cut=cut)
        return out.view(B, L)
    if generator is None and seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(int(seed) & ((1 << 63) - 1))
    flat = logits.reshape(B * L, K)
    rows = (lambda s, e: nucleus_filter(flat[s:e], top_p)) if nucleus else (lambda s, e: flat[s:e])
    return _chunked(rows, zt, a_s, a_t, kap, generator, kind, chunk_tokens).view(B, L)


def _chunked(logits_of, zt: Tensor, a_s: Tensor, a_t: Tensor, kap: Tensor | None, generator: torch.Generator | None,
             kind: StepKind, chunk_tokens: int) -> Tensor:
    """The PyTorch path over ``chunk_tokens`` rows at a time: at most ``chunk_tokens x K``
    temporaries, never ``B x L x K``. ``logits_of(start, end)`` gives the rows' logits."""
    flat_z = zt.reshape(-1)
    out = torch.empty_like(flat_z)
    for s in range(0, flat_z.numel(), chunk_tokens):
        e = min(flat_z.numel(), s + chunk_tokens)
        out[s:e] = _sample_rows(logits_of(s, e), flat_z[s:e], a_s[s:e], a_t[s:e], None if kap is None else kap[s:e],
                                generator, kind)
    return out


def sample_posterior_linear(h: Tensor, weight: Tensor, bias: Tensor | None, zt: Tensor, alpha_s: Tensor | float,
                            alpha_t: Tensor | float, seed: int | Tensor | None = None,
                            generator: torch.Generator | None = None,
                            final: str | None = None, kappa: Tensor | float | None = None, impl: str = "auto",
                            chunk_tokens: int = 256, top_p: float = 1.0) -> Tensor:
    """:func:`sample_posterior` of ``logits = h @ weight.T + bias`` without writing the logits:
    the Triton kernel computes them per vocabulary chunk (tensor cores on GPU); the PyTorch path
    computes ``chunk_tokens x K`` at a time. h: (B, L, D); weight: (K, D); bias: (K,) or None.
    With ``top_p < 1`` the PyTorch path still works chunk by chunk (a sort per chunk), while the
    Triton path writes the logits once (the nucleus cut needs several passes over them) and
    runs the cut and the logits kernel."""
    if h.dim() != 3 or weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"need h (B, L, D) and weight (K, D); got {tuple(h.shape)}, {tuple(weight.shape)}")
    B, L, D = h.shape
    K = weight.shape[0]
    _check(torch.Size((B, L, K)), zt, final)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    kind = STEP_KINDS[final]
    nucleus = top_p < 1 and kind != StepKind.GREEDY
    if nucleus and use_triton(h, impl, "sample_posterior_linear"):
        logits = torch.nn.functional.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
        return sample_posterior(logits, zt, alpha_s, alpha_t, seed=seed, generator=generator, final=final, top_p=top_p,
                                kappa=kappa, impl=impl)
    a_s, a_t, kap = token_rows(alpha_s, zt), token_rows(alpha_t, zt), token_rows(kappa, zt)
    if use_triton(h, impl, "sample_posterior_linear"):
        from duo_fast.kernels.sample_posterior import sample_posterior_linear_fwd

        w = weight.to(h.dtype).contiguous()
        b = None if bias is None else bias.to(h.dtype).contiguous()
        out = sample_posterior_linear_fwd(h.reshape(B * L, D).contiguous(), w, b, zt.reshape(-1).contiguous(), a_s,
                                          a_t, kap, _kernel_seed(seed, generator), int(kind))
        return out.view(B, L)
    if generator is None and seed is not None:
        generator = torch.Generator(device=h.device).manual_seed(int(seed) & ((1 << 63) - 1))
    flat_h = h.reshape(B * L, D)
    w, b = weight.float(), None if bias is None else bias.float()

    def rows(s: int, e: int) -> Tensor:
        logits = torch.nn.functional.linear(flat_h[s:e].float(), w, b)
        return nucleus_filter(logits, top_p) if nucleus else logits

    return _chunked(rows, zt, a_s, a_t, kap, generator, kind, chunk_tokens).view(B, L)
