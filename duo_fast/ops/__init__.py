"""Operators of the Duo training and sampling steps (PyTorch implementations)."""

from .posterior import sample_posterior
from .rb_loss import rb_loss

__all__ = ["rb_loss", "sample_posterior"]
