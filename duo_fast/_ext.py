"""The compiled extension ``duo_fast._C`` (csrc/) and what the Python side adds to its ops.

Importing ``duo_fast._C`` registers ``torch.ops.duo_fast.ttable_lookup`` (CPU, and CUDA when
built with it). Here we add its fake (meta) implementation, so ``torch.compile`` traces through
it, and its autograd formula (``d alpha / d gamma`` is the op's second output). If the
extension is not built, :data:`AVAILABLE` is False and callers use the PyTorch fallback.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["AVAILABLE", "IMPORT_ERROR", "warn_fallback_once"]

IMPORT_ERROR: Exception | None = None
try:
    from . import _C  # noqa: F401  (registers the ops)

    AVAILABLE = hasattr(torch.ops.duo_fast, "ttable_lookup")
except ImportError as e:  # not built (DUO_FAST_SKIP_EXT=1, or installed with build isolation)
    AVAILABLE = False
    IMPORT_ERROR = e

if AVAILABLE:

    @torch.library.register_fake("duo_fast::ttable_lookup")
    def _ttable_lookup_fake(gamma, q, dq, gamma_min, gamma_max, vocab_size):
        return gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _backward(ctx, grad_alpha, grad_dalpha):
        # dalpha/dgamma is returned as a constant: its own derivative is not provided.
        (dalpha,) = ctx.saved_tensors
        return grad_alpha * dalpha, None, None, None, None, None

    torch.library.register_autograd("duo_fast::ttable_lookup", _backward, setup_context=_setup_context)

_warned = False


def warn_fallback_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"duo_fast: the C++ extension duo_fast._C is not built ({IMPORT_ERROR}); using the pure-PyTorch "
                      "T-table lookup (same results, slower). Reinstall with `pip install --no-build-isolation -e .`.",
                      RuntimeWarning, stacklevel=3)
