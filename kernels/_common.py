"""What the kernel modules share: whether Triton runs in its interpreter, and the two operations
of their bf16/fp16 branch that Triton's interpreter gets wrong (``mma``, ``cast``), and the
random variates built from Philox words with exact tails (``exponential32``, ``normal32``;
docs/math.md section 2, "Random draws"). Never imports duo_fast."""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["interpreting", "mma", "cast", "exponential32", "normal32"]


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


@triton.jit
def exponential32(r):
    """One Exp(1) draw from one uint32 word, by inversion with full relative precision in both
    tails, for one ``log``: the upper half of the words gives ``-log(x)``,
    ``x = (m + 1/2) 2^-32 in (0, 1/2)`` with ``m < 2^31`` the word's distance from the top (exact
    integers: fp32 keeps 24 bits of x however small); the lower half ``-log1p(-x)``, ``x`` the
    same from the bottom: as ``-log(1 - x)`` for ``x >= 1/16`` (relative error <= 2^-25/x, under
    5e-7) and as ``x (1 + x/2 + x^2/3 + x^3/4 + x^4/5 + x^5/6)`` below (series error < 1e-8).
    Range [1.2e-10, 22.9]: ``-log E`` (a Gumbel) spans 26 nats; every interval's probability is the
    exact law's to within 2^-32. The reference map is ``duo_fast.reference.exponential_from_bits``."""
    up = r >= 0x80000000
    m = tl.where(up, r ^ 0xFFFFFFFF, r).to(tl.int32)               # < 2^31 either way
    x = (m.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    lg = tl.log(tl.where(up, x, 1.0 - x))
    series = x * (1.0 + x * (0.5 + x * (0.3333333333333333 + x * (0.25 + x * (0.2 + x * 0.16666666666666666)))))
    return tl.where(up | (x >= 0.0625), -lg, series)


@triton.jit
def normal32(r0, r1):
    """One standard normal draw from two uint32 words (Box-Muller, cosine branch): the radius
    uses ``U = (r0 >> 1 + 1/2) 2^-31``, exact integers with 24 bits of relative precision near 0,
    so |eps| reaches 6.66 (23-bit uniforms stopped at 5.77)."""
    u1 = ((r0 >> 1).to(tl.int32).to(tl.float32) + 0.5) * 4.656612873077393e-10       # (0, 1), 31 bits
    u2 = (r1 >> 8).to(tl.int32).to(tl.float32) * 5.960464477539063e-08               # [0, 1), 24 bits
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
