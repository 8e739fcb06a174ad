"""Operators of the Duo training and sampling steps: one module per operator, each holding its
``autograd.Function`` and its PyTorch path, with the Triton kernels of ``duo_fast.kernels`` and
the C++ ops of ``csrc/`` (loaded by ``extension``) behind them. Which implementation runs is
decided in one place, ``backends`` (``backend()`` reports it).

May import: ``duo_fast.core``, ``duo_fast.kernels`` (never ``duo_fast.reference``, the oracle the
tests compare these operators against).
"""

from __future__ import annotations

import torch

from duo_fast.ops.backends import report
from duo_fast.ops.posterior import sample_posterior, sample_posterior_linear
from duo_fast.ops.rb_loss import rb_loss, rb_loss_linear
from duo_fast.ops.relaxed import coupled_latents, relaxed_embedding

__all__ = ["rb_loss", "rb_loss_linear", "relaxed_embedding", "coupled_latents", "sample_posterior",
           "sample_posterior_linear", "backend"]


def backend(device: str | torch.device = "cpu") -> dict[str, str]:
    """Which implementation each operator runs on ``device`` (``triton``, ``cpp``, ``torch``, ...),
    as ``duo_fast.ops.backends`` decides it (``duo-fast env`` adds the reasons)."""
    return {op: c.impl for op, c in report(device).items()}
