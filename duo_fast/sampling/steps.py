"""The per-step draw of the sampler behind one interface, :class:`Step`: given the denoiser, the
current ``z_t`` and the step's device scalars, return ``z_s``. Every variant of the public
samplers is one of these:

* :class:`PosteriorStep`: the exact posterior draw (docs/math.md section 2), a Psi mixture when
  ``kappa`` is given (section 2b), nucleus sampling of ``x_theta`` with ``top_p < 1``, fused with
  the output projection (``fused``: the logits are never written) or from the logits; with
  ``final`` set it is the final step at ``t_min`` (``greedy``: the argmax, the Greedy-Tail
  sampler; ``ancestral``: the posterior with ``alpha_s = 1``);
* :class:`CustomStep`: a caller's ``step_fn(logits, z, alpha_s, alpha_t, generator=...)`` (the
  benchmark's reference-style sampler), never captured in a graph.

A step reads nothing back and turns no Python number into a tensor: the same code runs eagerly
and inside a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from duo_fast.model.protocol import Denoiser
from duo_fast.ops import sample_posterior, sample_posterior_linear

__all__ = ["Step", "PosteriorStep", "CustomStep"]


class Step(Protocol):
    """``(model, z (B, L) int64, alpha_s, alpha_t, sigma: 0-d device tensors, seed (1,) int64 device
    tensor, kappa: 0-d tensor or None) -> z_s (B, L) int64``."""

    def __call__(self, model: Denoiser, z: Tensor, alpha_s: Tensor, alpha_t: Tensor, sigma: Tensor, seed: Tensor,
                 kappa: Tensor | None) -> Tensor: ...


@dataclass(frozen=True)
class PosteriorStep:
    """The posterior (or Psi, nucleus, final) draw; ``generator`` only serves the PyTorch path's
    draws when no seed reaches it."""

    fused: bool
    top_p: float = 1.0
    final: str | None = None
    generator: torch.Generator | None = None

    def __call__(self, model: Denoiser, z: Tensor, alpha_s: Tensor, alpha_t: Tensor, sigma: Tensor, seed: Tensor,
                 kappa: Tensor | None) -> Tensor:
        if self.fused:
            h = model(z, sigma, return_hidden=True)
            lin = model.output_projection()
            return sample_posterior_linear(h, lin.weight, lin.bias, z, alpha_s, alpha_t, seed=seed,
                                           generator=self.generator, final=self.final, kappa=kappa, top_p=self.top_p)
        return sample_posterior(model(z, sigma), z, alpha_s, alpha_t, seed=seed, generator=self.generator,
                                final=self.final, top_p=self.top_p, kappa=kappa)


@dataclass(frozen=True)
class CustomStep:
    """A caller's draw from the logits: ``step_fn(logits, z, alpha_s, alpha_t, generator=...)``."""

    step_fn: Callable[..., Tensor]
    generator: torch.Generator | None = None

    def __call__(self, model: Denoiser, z: Tensor, alpha_s: Tensor, alpha_t: Tensor, sigma: Tensor, seed: Tensor,
                 kappa: Tensor | None) -> Tensor:
        return self.step_fn(model(z, sigma), z, alpha_s, alpha_t, generator=self.generator)
