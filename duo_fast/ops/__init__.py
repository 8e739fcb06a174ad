"""Operators of the Duo training and sampling steps."""

from __future__ import annotations

import torch

from .posterior import sample_posterior
from .rb_loss import rb_loss

__all__ = ["rb_loss", "sample_posterior", "backend"]


def backend(device: str | torch.device = "cpu") -> dict[str, str]:
    """Which implementation each operator runs on ``device`` (``cpp``, ``torch``, ...)."""
    from ..ttable import lookup_backend

    return {"ttable_lookup": lookup_backend(torch.device(device)), "rb_loss": "torch", "sample_posterior": "torch"}
