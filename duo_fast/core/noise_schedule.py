"""Noise schedules of Duo (docs/math.md sections 1 and 4): the discrete schedules ``alpha(t)``,
the Gaussian coefficients of a curriculum ``gamma``, and the broadcast of per-sequence or
per-token values against token ids. Plain PyTorch math shared by every layer (the oracle
``duo_fast.reference`` re-exports it)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["per_token", "alpha_loglinear", "alpha_cosine", "gaussian_coefficients", "NOISE_SCHEDULES"]


def per_token(alpha: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-sequence ``(B,)`` or per-token ``(B, L)`` value against ``like`` (B, L)."""
    if isinstance(alpha, (float, int)):
        a = torch.tensor(float(alpha), dtype=torch.float64, device=like.device)   # keep Python floats exact
    else:
        a = torch.as_tensor(alpha, device=like.device)
    if a.dim() == 1 and like.dim() == 2:
        a = a[:, None]
    return a.expand(like.shape) if a.dim() > 0 else a


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


def gaussian_coefficients(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``(at, st) = (sqrt(sigmoid(-gamma)), sqrt(sigmoid(gamma)))`` (section 4)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


NOISE_SCHEDULES = {"loglinear": alpha_loglinear, "cosine": alpha_cosine}
