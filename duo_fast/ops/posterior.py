"""Exact posterior sampling as a three-part mixture (duo-math.md section 2), PyTorch path.

``q(z_s | z_t, x_theta)`` is a mixture of "draw from x_theta" (weight ``A = a_s - a_t``),
"draw uniformly" (``Bu = (1 - a_ts)(1 - a_s)``) and "stay at z_t" (``C = a_t K x_theta[z_t] +
a_ts - a_t``). Only ``x_theta[z_t]`` needs normalised probabilities; the draw from ``x_theta``
is a Gumbel-argmax over the logits. No float64 ``B x L x K`` posterior is ever built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import per_token

__all__ = ["sample_posterior", "nucleus_filter"]

FINAL_MODES = (None, "ancestral", "greedy")


def nucleus_filter(logits: Tensor, top_p: float) -> Tensor:
    """Logits with everything outside the smallest set of mass >= ``top_p`` set to -inf (the
    most likely id always stays). Needs a sort over the vocabulary. (B, L, K) -> (B, L, K)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1:
        return logits
    sorted_logits, order = logits.float().sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs                   # mass strictly before each id
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.float().masked_fill(drop, float("-inf"))


def sample_posterior(logits: Tensor, zt: Tensor, alpha_s: Tensor | float, alpha_t: Tensor | float,
                     generator: torch.Generator | None = None, final: str | None = None,
                     top_p: float = 1.0) -> Tensor:
    """Draw ``z_s ~ q(z_s | z_t, x_theta)`` with ``x_theta = softmax(logits)``, or its nucleus
    (top-p) renormalisation when ``top_p < 1`` (section 2).

    logits: (B, L, K) any float dtype; zt: (B, L) int64; alpha_s >= alpha_t, each (B,), (B, L)
    or a scalar. ``final='ancestral'`` uses ``alpha_s = 1``; ``final='greedy'`` returns
    ``argmax logits``. Returns (B, L) int64.
    """
    if final not in FINAL_MODES:
        raise ValueError(f"final must be one of {FINAL_MODES}, got {final!r}")
    if logits.dim() != 3 or zt.shape != logits.shape[:2]:
        raise ValueError(f"need logits (B, L, K) and zt (B, L); got {tuple(logits.shape)}, {tuple(zt.shape)}")
    if final == "greedy":
        return logits.argmax(-1)
    K = logits.shape[-1]
    logits = nucleus_filter(logits, top_p) if top_p < 1 else logits.float()
    a_t = per_token(alpha_t, zt).double()
    a_s = torch.ones_like(a_t) if final == "ancestral" else per_token(alpha_s, zt).double()
    lse = torch.logsumexp(logits, -1)
    x_i = torch.exp(logits.gather(-1, zt[..., None])[..., 0] - lse).double()
    a_ts = a_t / a_s
    A = a_s - a_t
    Bu = (1 - a_ts) * (1 - a_s)
    C = a_t * K * x_i + a_ts - a_t
    Z = A + Bu + C
    u = torch.rand(zt.shape, generator=generator, device=zt.device, dtype=torch.float64) * Z
    g = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    draw_model = (logits - torch.log(-torch.log(g.clamp_min(1e-30)))).argmax(-1)     # Gumbel-max
    draw_uniform = torch.randint(0, K, zt.shape, generator=generator, device=zt.device)
    return torch.where(u < A, draw_model, torch.where(u < A + Bu, draw_uniform, zt))
