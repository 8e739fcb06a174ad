"""Psi-sampler schedules: the time grid and the per-step kappa of every mode (docs/math.md section 2b).

A Psi step draws from ``kappa q(z_s | z_t) + (1 - kappa)(a_s q0 + (1 - a_s)/K)``; this module
only decides *which* times and *which* kappa each step uses, on the host, before the loop, so the
fused kernels and the CUDA-graph loop run Psi exactly as they run the plain sampler.

Definitions (the public trainer's ``sampling.psi.*``, same names and values):

* ``time_profile``: ``linear`` (``t = linspace(1, t_min, N + 1)``) or
  ``linear-constant-linear-C`` / ``linear-constant-linear-C-inv``: with ``n = N + 1`` times,
  ``n_hi = round(high_frac n)`` times from 1 down to ``c``, ``n_mid = round(middle_frac n)``
  times at ``c`` (steps with ``s = t``: pure corrector steps), the rest from ``c`` down to
  ``t_min``; ``c = C`` or, with ``-inv``, the time whose ``alpha`` is ``C`` (the schedule's
  inverse, without its ``eps``).
* modes, one per phase (high / middle / low: the same split of the ``n`` times):
  ``pure-posterior`` (kappa 1), ``pure-pc`` (0), ``constant-ETA`` (ETA), and the ReMDM-style
  ``constant-remdm-ETA`` (``sig = ETA``), ``max-capped-ETA``
  (``sig = min(ETA, (1 - a_s)/a_t)``, ``ETA`` where ``a_t = 0``), ``max-rescale-ETA``
  (``sig = ETA min(ETA, (1 - a_s)/a_t)``, ``ETA`` where ``a_t = 0``) with
  ``kappa = clip(1 - sig/(1 - a_s), 0, 1)`` over consecutive times of the phase and kappa 1 at
  the phase's last time.

Python's ``round`` (half to even) is used for the phase sizes, as the public code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from duo_fast.core.noise_schedule import alpha_cosine, alpha_loglinear

__all__ = ["PsiConfig", "PSI_PRESETS", "time_grid", "mode_kappas", "step_kappas", "check_mode", "check_profile"]

_PLAIN_MODES = ("pure-posterior", "pure-pc")
_ETA_PREFIXES = ("constant-remdm-", "max-capped-", "max-rescale-", "constant-")


@dataclass(frozen=True)
class PsiConfig:
    """The public ``sampling.psi`` block (same names, same defaults)."""

    time_profile: str = "linear"
    high_mode: str = "pure-posterior"
    middle_mode: str = "pure-posterior"
    low_mode: str = "pure-posterior"
    high_frac: float = 0.2
    middle_frac: float = 0.6

    def __post_init__(self) -> None:
        check_profile(self.time_profile)
        for name in ("high_mode", "middle_mode", "low_mode"):
            check_mode(getattr(self, name), name)
        for name in ("high_frac", "middle_frac"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"psi {name} must be in [0, 1], got {v}")
        if self.high_frac + self.middle_frac > 1.0:
            raise ValueError(f"psi high_frac + middle_frac must be <= 1, got {self.high_frac} + {self.middle_frac}")


def _eta(mode: str) -> float:
    return float(mode.rsplit("-", 1)[-1])


def check_mode(mode: str, what: str = "mode") -> None:
    """Raise ValueError unless ``mode`` is one of the public modes with a valid ETA."""
    if mode in _PLAIN_MODES:
        return
    if not mode.startswith(_ETA_PREFIXES):
        raise ValueError(f"psi {what} must be pure-posterior, pure-pc, constant-ETA, constant-remdm-ETA, "
                         f"max-capped-ETA or max-rescale-ETA, got {mode!r}")
    try:
        eta = _eta(mode)
    except ValueError:
        raise ValueError(f"psi {what} {mode!r}: ETA must be a number") from None
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"psi {what} {mode!r}: ETA must be a finite number >= 0")
    if mode.startswith("constant-") and not mode.startswith("constant-remdm-") and eta > 1:
        raise ValueError(f"psi {what} {mode!r}: a constant kappa must be in [0, 1]")


def check_profile(profile: str) -> None:
    """Raise ValueError unless ``profile`` is linear or linear-constant-linear-C[-inv] with C in [0, 1]."""
    if profile == "linear":
        return
    parts = profile.split("-")
    ok = profile.startswith("linear-constant-linear-") and len(parts) in (4, 5) and (len(parts) == 4 or parts[4] == "inv")
    try:
        c = float(parts[3]) if ok else math.nan
    except ValueError:
        c = math.nan
    if not (ok and 0.0 <= c <= 1.0):
        raise ValueError(f"psi time_profile must be linear, linear-constant-linear-C or linear-constant-linear-C-inv "
                         f"with C in [0, 1], got {profile!r}")


def _t_for_alpha(alpha: float, schedule: str) -> float:
    """The schedule's inverse as the public noise classes define it (without their eps)."""
    if schedule == "loglinear":
        return 1.0 - alpha
    return 1.0 - 2.0 / math.pi * math.acos(1.0 - alpha)


def time_grid(psi: PsiConfig | None, steps: int, t_min: float, schedule: str) -> Tensor:
    """The ``steps + 1`` sampling times, float64: step ``i`` goes from ``t[i]`` to ``t[i + 1]``."""
    n = steps + 1
    if psi is None or psi.time_profile == "linear":
        return torch.linspace(1.0, t_min, n, dtype=torch.float64)
    c = float(psi.time_profile.split("-")[3])
    if psi.time_profile.endswith("-inv"):
        c = _t_for_alpha(c, schedule)
    n_hi, n_mid = round(psi.high_frac * n), round(psi.middle_frac * n)
    return torch.cat([torch.linspace(1.0, c, n_hi, dtype=torch.float64),
                      torch.full((n_mid,), c, dtype=torch.float64),
                      torch.linspace(c, t_min, n - n_hi - n_mid, dtype=torch.float64)])


def mode_kappas(mode: str, times: Tensor, schedule: str) -> Tensor:
    """kappa at each of ``times`` (one phase; float64, same length)."""
    n = len(times)
    if mode == "pure-posterior":
        return torch.ones(n, dtype=torch.float64)
    if mode == "pure-pc":
        return torch.zeros(n, dtype=torch.float64)
    eta = _eta(mode)
    if mode.startswith("constant-") and not mode.startswith("constant-remdm-"):
        return torch.full((n,), eta, dtype=torch.float64)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    alphas = _alpha(times, schedule)
    a_t, a_s = alphas[:-1], alphas[1:]
    if mode.startswith("max-capped-"):
        sig = torch.where(a_t == 0, eta, torch.clamp(torch.where(a_t == 0, 1.0, (1 - a_s) / a_t), max=eta))
    elif mode.startswith("max-rescale-"):
        sig = torch.where(a_t > 0, torch.clamp(torch.where(a_t > 0, (1 - a_s) / a_t, 1.0), max=eta), 1.0) * eta
    else:                                                    # constant-remdm-ETA
        sig = torch.full_like(a_t, eta)
    kappa = torch.clamp(1 - sig / (1 - a_s), 0.0, 1.0)
    return torch.cat([kappa, torch.ones(1, dtype=torch.float64)])


def _alpha(t: Tensor, schedule: str) -> Tensor:
    return (alpha_loglinear if schedule == "loglinear" else alpha_cosine)(t)[0]


def step_kappas(psi: PsiConfig, times: Tensor, schedule: str) -> Tensor:
    """kappa of every time of the grid, phase by phase: ``(steps + 1,)`` float64; step ``i`` uses ``[i]``."""
    n = len(times)
    n_hi, n_mid = round(psi.high_frac * n), round(psi.middle_frac * n)
    kappas = torch.cat([mode_kappas(psi.high_mode, times[:n_hi], schedule),
                        mode_kappas(psi.middle_mode, times[n_hi:n_hi + n_mid], schedule),
                        mode_kappas(psi.low_mode, times[n_hi + n_mid:], schedule)])
    assert len(kappas) == n          # each mode gives kappa in [0, 1] (clipped, or a checked constant)
    return kappas


# The text recipes of the public scripts/psi_samplers/owt (Duo rows): sampler settings and Psi block.
PSI_PRESETS: dict[str, dict] = {
    "duo-loop-remdm": dict(steps=256, top_p=0.95, noise_removal="ancestral", schedule="loglinear",
                           psi=PsiConfig("linear-constant-linear-0.9-inv", "pure-posterior", "constant-remdm-0.01",
                                         "pure-posterior", 0.45, 0.5)),
    "duo-max-capped-remdm": dict(steps=256, top_p=0.9, noise_removal="ancestral", schedule="loglinear",
                                 psi=PsiConfig("linear", "max-capped-0.01", "max-capped-0.01", "max-capped-0.01",
                                               0.0, 0.0)),
    "duo-max-rescale-eta": dict(steps=256, top_p=0.9, noise_removal="ancestral", schedule="loglinear",
                                psi=PsiConfig("linear", "max-rescale-0.05", "max-rescale-0.05", "max-rescale-0.05",
                                              0.0, 0.0)),
}
