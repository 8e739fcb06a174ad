"""Operators of the Duo training and sampling steps."""

from __future__ import annotations

import torch

from .posterior import sample_posterior, sample_posterior_linear
from .rb_loss import rb_loss, rb_loss_linear
from .relaxed import coupled_latents, relaxed_embedding

__all__ = ["rb_loss", "rb_loss_linear", "relaxed_embedding", "coupled_latents", "sample_posterior",
           "sample_posterior_linear", "backend"]


def backend(device: str | torch.device = "cpu") -> dict[str, str]:
    """Which implementation each operator runs on ``device`` (``cpp``, ``torch``, ...)."""
    from ..ttable import lookup_backend
    from ._dispatch import use_triton

    probe = torch.empty(0, device=device)
    from .rb_loss import cpp_available

    fused = "triton" if use_triton(probe) else "torch"
    loss = "cpp" if fused == "torch" and probe.device.type == "cpu" and cpp_available() else fused
    return {"ttable_lookup": lookup_backend(torch.device(device)), "rb_loss": loss, "sample_posterior": fused,
            "relaxed_embedding": fused}
