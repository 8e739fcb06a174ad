"""Random draws of the Duo math (docs/math.md sections 1-3 and "Random draws"): Exp(1) variates
with exact tails, the public trainer's antithetic times and the forward process ``q_t``. Plain
PyTorch shared by every layer (the oracle ``duo_fast.reference`` re-exports it)."""

from __future__ import annotations

import torch
from torch import Tensor

from duo_fast.core.noise_schedule import per_token

__all__ = ["exponential_from_bits", "exponential_draws", "stratified_times", "sample_qt"]


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
