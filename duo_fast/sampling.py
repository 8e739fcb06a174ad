"""Few-step ancestral sampling of a Duo denoiser (duo-math.md section 2).

``z_1 ~ Uniform``; times ``linspace(1, t_min, N + 1)``; each of the ``N`` steps is one denoiser
call at ``(z_t, sigma = -log alpha_t)`` and one exact posterior draw; then the final step at
``t_min``: ``greedy`` (argmax of one more denoiser call, the Greedy-Tail sampler),
``ancestral`` (the posterior with ``alpha_s = 1``) or ``none``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import reference as ref
from .model import DiT
from .ops import sample_posterior

__all__ = ["SamplerConfig", "generate", "SCHEDULES"]

SCHEDULES: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "loglinear": ref.alpha_loglinear,
    "cosine": ref.alpha_cosine,
}
NOISE_REMOVAL = ("greedy", "ancestral", "none")


@dataclass
class SamplerConfig:
    steps: int = 8
    batch: int = 16
    length: int | None = None            # default: the model's length
    schedule: str = "loglinear"
    noise_removal: str = "greedy"
    top_p: float = 1.0                   # nucleus sampling of x_theta when < 1
    kappa: tuple[float, float] | None = None   # Psi sampler: kappa from [0] at the first step to [1] at the last
    t_min: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError("steps and batch must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.noise_removal not in NOISE_REMOVAL:
            raise ValueError(f"noise_removal must be one of {NOISE_REMOVAL}, got {self.noise_removal!r}")
        if self.kappa is not None and not all(0 <= k <= 1 for k in self.kappa):
            raise ValueError(f"Psi kappa must lie in [0, 1], got {self.kappa}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}")


@torch.no_grad()
def generate(model: DiT, cfg: SamplerConfig, device: torch.device | str | None = None,
             progress: bool = True, step_fn: Callable[..., Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
    """Sample ``cfg.batch`` sequences. Returns ``(ids (batch, length) int64, stats)`` with
    ``stats`` = seconds, nfe (denoiser calls), samples_per_s, tokens_per_s, nfe_per_s.
    ``step_fn(logits, z, alpha_s, alpha_t, generator=...)`` replaces the posterior draw of the
    steps before the final one (the benchmark's reference-style sampler uses it)."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    K = model.config.vocab_size
    L = cfg.length or model.config.model_length
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    # Seeds of the Triton kernels, one per posterior draw, drawn up front on the CPU (no syncs).
    seeds = torch.randint(0, 2**62, (cfg.steps + 1,), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    kappas = (None if cfg.kappa is None else
              torch.linspace(cfg.kappa[0], cfg.kappa[1], cfg.steps, dtype=torch.float64).tolist())
    schedule = SCHEDULES[cfg.schedule]
    # The grid is a handful of floats: computed on the CPU, so no step synchronises with the device.
    alphas = schedule(torch.linspace(1.0, cfg.t_min, cfg.steps + 1, dtype=torch.float64))[0].tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    z = torch.randint(0, K, (cfg.batch, L), generator=gen, device=device)
    nfe = 0
    for i in tqdm(range(cfg.steps), disable=not progress, desc="sample", leave=False, dynamic_ncols=True):
        a_t, a_s = alphas[i], alphas[i + 1]
        sigma = torch.full((cfg.batch,), -math.log(a_t), device=device)
        logits = model(z, sigma)
        nfe += 1
        if step_fn is not None:
            z = step_fn(logits, z, a_s, a_t, generator=gen)
        else:
            z = sample_posterior(logits, z, a_s, a_t, seed=seeds[i], generator=gen, top_p=cfg.top_p,
                                 kappa=None if kappas is None else kappas[i])
    if cfg.noise_removal != "none":
        sigma = torch.full((cfg.batch,), -math.log(alphas[-1]), device=device)
        logits = model(z, sigma)
        nfe += 1
        z = sample_posterior(logits, z, 1.0, alphas[-1], seed=seeds[-1], generator=gen, final=cfg.noise_removal,
                             top_p=cfg.top_p)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    stats = {"seconds": dt, "nfe": nfe, "samples_per_s": cfg.batch / dt, "tokens_per_s": cfg.batch * L / dt,
             "nfe_per_s": nfe / dt}
    return z, stats
