"""What the public implementation does, written out for the benchmarks to time against ours
(the numerically careful reference math is ``duo_fast.reference``; these are its costly
reference-*style* execution paths)."""

from __future__ import annotations

import torch

from .. import reference as ref

__all__ = ["reference_ttable_lookup", "reference_relaxed_embedding"]


def reference_ttable_lookup(gamma: torch.Tensor, p_table: torch.Tensor, gmin: float, gmax: float,
                            K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round gamma to the nearest grid point, gather p, finite-difference the derivative from the
    neighbours, and check the range with ``.item()`` (a host synchronisation) on every call."""
    if bool((gamma < gmin).any().item()) or bool((gamma > gmax).any().item()):
        raise ValueError("gamma out of range")
    n = p_table.shape[0]
    h = (gmax - gmin) / (n - 1)
    idx = torch.round((gamma - gmin) / h).long()
    p = p_table[idx]
    dp = (p_table[(idx + 1).clamp(max=n - 1)] - p_table[(idx - 1).clamp(min=0)]) / (2 * h)
    return (K * p - 1) / (K - 1), K / (K - 1) * dp


def reference_relaxed_embedding(x0: torch.Tensor, gamma: torch.Tensor, tau: float, E: torch.Tensor,
                                eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The curriculum input as the public implementation builds it: the one-hot of ``x``, the
    noise, the latents and their softmax all materialised as (B, L, K), then an ``einsum`` with
    the (K, D) embedding. Returns (h0 (B, L, D), zt (B, L))."""
    K = E.shape[0]
    onehot = torch.nn.functional.one_hot(x0, K).to(E.dtype)
    if eps is None:
        eps = torch.randn(onehot.shape, device=x0.device, dtype=E.dtype)
    at, st = ref.gaussian_coefficients(gamma.to(E.dtype))
    w = at[:, None, None] * onehot + st[:, None, None] * eps.to(E.dtype)
    return torch.einsum("blk,kd->bld", torch.softmax(w / tau, -1), E), w.argmax(-1)
