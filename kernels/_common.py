"""What the kernel modules share: whether Triton runs in its interpreter, and the two operations
of their bf16/fp16 branch that Triton's interpreter gets wrong (``mma``, ``cast``). Never imports
duo_fast."""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["interpreting", "mma", "cast"]


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run as Python on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. ``IEEE``: fp32 operands, an exact fp32 product (no
    TF32). Otherwise the operands are bf16/fp16 and the GPU uses tensor cores. ``EMULATE`` (set by
    the launchers under the interpreter, whose bf16 ``tl.dot`` multiplies raw bit patterns) computes
    that same product from the same low-precision values, upcast exactly to fp32: every load, cast
    and store of the bf16 branch still runs as on the GPU; only the dot instruction is emulated."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def cast(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """``x.to(dtype)`` with the GPU's rounding to nearest even. Triton 3.9's interpreter truncates
    fp32 -> bf16 (0.99997 becomes 0.99609), so under ``EMULATE`` the fp32 bits are rounded to the
    nearest bf16 first, after which the truncating conversion is exact."""
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)
