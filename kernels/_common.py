"""What the kernel modules share: whether Triton runs in its interpreter, and the operands of
``tl.dot`` there. Never imports duo_fast."""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "dot_operands"]


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run as Python on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_operands(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Operands of a kernel's ``tl.dot``. Triton 3.9's interpreter computes ``tl.dot`` wrongly
    for bf16/fp16 inputs; their products are exact in fp32 and the GPU accumulates in fp32, so in
    the interpreter the inputs are upcast (the same values up to summation order). Unchanged on GPU."""
    if interpreting():
        return [None if t is None else t.float() for t in ts]
    return list(ts)
