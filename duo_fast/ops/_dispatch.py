"""Choosing an implementation: ``auto`` runs Triton on CUDA tensors, PyTorch on CPU tensors,
and Triton on CPU tensors when ``TRITON_INTERPRET=1`` (tests). ``DUO_FAST_IMPL=torch|triton``
or ``impl=`` forces one; a forced implementation that cannot run raises (only ``auto`` chooses)."""

from __future__ import annotations

import os

import torch

from ..reference import per_token

IMPLS = ("auto", "torch", "triton")


def use_triton(t: torch.Tensor, impl: str = "auto") -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("DUO_FAST_IMPL", "auto")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    runnable = t.is_cuda or (interpret and t.device.type == "cpu")
    if impl == "torch":
        return False
    if impl == "triton" and not runnable:
        raise RuntimeError("impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    return runnable


def seed_from(seed: int | None, generator: torch.Generator | None) -> int:
    """A 62-bit seed for the Triton kernels: ``seed`` itself, else one drawn from ``generator``
    (or torch's default CPU generator). Drawn on the CPU: no device synchronisation."""
    if seed is not None:
        return int(seed) & ((1 << 62) - 1)
    gen = generator if generator is not None and generator.device.type == "cpu" else None
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def token_rows(v: "torch.Tensor | float | None", zt: torch.Tensor) -> "torch.Tensor | None":
    """A scalar, per-sequence (B,) or per-token (B, L) value as a contiguous float64 (B * L,)
    row vector on ``zt``'s device (None stays None)."""
    if v is None:
        return None
    return per_token(v, zt).to(device=zt.device, dtype=torch.float64).expand(zt.shape).reshape(-1).contiguous()
