"""Learning-rate schedules of the public trainer, as multipliers of the base learning rate per
optimizer step ``k`` (0-based: the first update uses ``k = 0``; a ``LambdaLR`` stepped once per
update). docs/training.md lists them with the public config each one reproduces.

* ``constant``: ``min(1, k / warmup)`` (``transformers.get_constant_schedule_with_warmup``, the
  public default ``constant_warmup``; the first update has learning rate 0).
* ``cosine``: the public ``cosine_decay_warmup`` (timm's cosine scheduler with a warm-up prefix):
  ``lr_init + k (lr - lr_init)/warmup`` during the warm-up, then
  ``lr_min + (lr - lr_min)(1 + cos(pi j / (steps - warmup)))/2`` with ``j = k - warmup``, and
  ``lr_min`` after the cycle; ``lr_init = lr_min = 1e-6`` there (the public values).
* ``step``: the public ``step_scheduler`` (``LRHalveScheduler``): the constant warm-up, then
  ``0.5 ** ((k - warmup) // halve_every)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["LR_SCHEDULES", "lr_multiplier"]

LR_SCHEDULES = ("constant", "cosine", "step")


def lr_multiplier(schedule: str, lr: float, warmup: int, steps: int, halve_every: int = 10_000,
                  lr_min: float = 1e-6, lr_init: float = 1e-6) -> Callable[[int], float]:
    """``k -> learning rate at update k / lr`` for one of :data:`LR_SCHEDULES`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return lambda k: min(1.0, k / warmup) if warmup > 0 else 1.0
    if schedule == "step":
        return lambda k: k / warmup if k < warmup else 0.5 ** ((k - warmup) // max(1, halve_every))
    cycle = max(1, steps - warmup)

    def cosine(k: int) -> float:
        if k < warmup:
            return (lr_init + k * (lr - lr_init) / warmup) / lr
        j = k - warmup
        if j >= cycle:
            return lr_min / lr
        return (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * j / cycle))) / lr

    return cosine
