"""What the kernel modules share: whether Triton runs in its interpreter, and the two operations
of their bf16/fp16 branch that Triton's interpreter gets wrong (``mma``, ``cast``), and the
random variates built from Philox words with exact tails (``exponential32``, ``normal32``;
docs/math.md section 2, "Random draws"). Never imports duo_fast."""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["interpreting", "mma", "cast", "linear_tile", "lg2_approx", "exponential32_log2e", "exponential32",
           "normal_pair", "normal32"]


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run as Python on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# fixed for the life of the process, like TRITON_INTERPRET itself
_INTERPRETER = tl.constexpr(interpreting())


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
def linear_tile(h_rows, w_rows, D, IEEE: tl.constexpr, EMULATE: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``h[rows] @ W[cols]^T`` of one (BLOCK_M, BLOCK_K) tile with fp32 accumulation, stepping
    BLOCK_D along D; ``h_rows`` (BLOCK_M, 1) and ``w_rows`` (BLOCK_K, 1) point at the rows (callers
    clamp rows past their end, so only D needs a mask, and none when BLOCK_D divides it)."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            hb = tl.load(h_rows + dd[None, :])
            wb = tl.load(w_rows + dd[None, :])
        else:
            hb = tl.load(h_rows + dd[None, :], mask=(dd < D)[None, :], other=0.0)
            wb = tl.load(w_rows + dd[None, :], mask=(dd < D)[None, :], other=0.0)
        acc = mma(hb, tl.trans(wb), acc, IEEE, EMULATE)
    return acc


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
def lg2_approx(x):
    """log2 of positive normal float32 ``x`` by the GPU's ``lg2.approx`` (one MUFU instruction;
    libdevice's accurate ``logf``, which ``tl.log`` lowers to, is ~25). Error: at most 2 ulp for
    ``x`` outside [0.5, 2], at most 2^-22 absolute inside (the CUDA guide's bound for
    ``__log2f``). The interpreter cannot run PTX and computes the log exactly: only this
    instruction differs from the GPU, as with ``mma``."""
    if _INTERPRETER:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def exponential32_log2e(r):
    """``log2(e) E`` for ``E`` the Exp(1) draw of :func:`exponential32` (the sampler works in base
    2, where ``-log2`` of it is a Gumbel up to a constant shift and ``log2(e)`` folds into the
    series): no multiplication by ``ln 2``."""
    up = r >= 0x80000000
    m = tl.where(up, r ^ 0xFFFFFFFF, r).to(tl.int32)               # < 2^31 either way
    x = (m.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    lg = lg2_approx(tl.where(up, x, 1.0 - x))
    # log2(e) x (1 + x/2 + x^2/3 + x^3/4 + x^4/5 + x^5/6): -log2(1 - x) for small x
    series = x * (1.4426950408889634 + x * (0.7213475204444817 + x * (0.48089834696298783 + x * (
        0.36067376022224085 + x * (0.28853900817779266 + x * 0.2404491734814939)))))
    return tl.where(up | (x >= 0.0625), -lg, series)


@triton.jit
def exponential32(r):
    """One Exp(1) draw from one uint32 word, by inversion with full relative precision in both
    tails: the upper half of the words gives ``-log(x)``, ``x = (m + 1/2) 2^-32 in (0, 1/2)`` with
    ``m < 2^31`` the word's distance from the top (exact integers: fp32 keeps 24 bits of x however
    small); the lower half ``-log1p(-x)``, ``x`` the same from the bottom: as ``-log(1 - x)`` for
    ``x >= 1/16`` and as ``x (1 + x/2 + x^2/3 + x^3/4 + x^4/5 + x^5/6)`` below (series error
    < 1e-8). Range [1.2e-10, 22.9]: ``-log E`` (a Gumbel) spans 26 nats; every interval's
    probability is the exact law's to within 2^-32. The logs are :func:`lg2_approx`: on the GPU
    its error adds at most 3e-7 relative to ``E`` in the upper half and 6e-6 relative in the
    ``-log(1 - x)`` branch (``E`` in [0.065, 0.69]); the tails (``E`` near 0 from the series, large
    ``E`` from ``-log x``) keep their relative precision. The reference map is
    ``duo_fast.reference.exponential_from_bits``."""
    return exponential32_log2e(r) * 0.6931471805599453


@triton.jit
def _cos_sin_approx(theta):
    """(cos, sin) of ``theta`` in [0, 2 pi) by the GPU's ``cos.approx``/``sin.approx`` (one MUFU
    instruction each, absolute error <= 2^-20.9; libdevice's ``cosf`` is ~120 instructions of
    argument reduction); exact in the interpreter (it cannot run PTX)."""
    if _INTERPRETER:
        return tl.cos(theta), tl.sin(theta)
    else:
        c = tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=r,r", [theta], dtype=tl.float32, is_pure=True,
                                      pack=1)
        s = tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=r,r", [theta], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return c, s


@triton.jit
def normal_pair(r0, r1):
    """Two independent standard normal draws from two uint32 words (Box-Muller: ``R cos``,
    ``R sin``). The radius uses ``U = (r0 >> 1 + 1/2) 2^-31``, exact integers with 24 bits of
    relative precision near 0, so |eps| reaches 6.66 (23-bit uniforms stopped at 5.77); the
    angle ``2 pi (r1 >> 8) 2^-24``. On the GPU the log, square root, cosine and sine are one
    MUFU instruction each (:func:`lg2_approx`, ``tl.sqrt``, :func:`_cos_sin_approx`): absolute
    error of a draw below ``R 2^-20`` (4e-6 at the largest radius), and the radius never NaN."""
    u1 = ((r0 >> 1).to(tl.int32).to(tl.float32) + 0.5) * 4.656612873077393e-10       # (0, 1), 31 bits
    u2 = (r1 >> 8).to(tl.int32).to(tl.float32) * 5.960464477539063e-08               # [0, 1), 24 bits
    # sqrt(-2 ln u1); lg2.approx (absolute error 2^-22 near 1) can return a log >= 0 for u1 just
    # below 1, and 0 is then the radius (the exact one is below 6e-4 there), never a NaN
    radius = tl.sqrt(tl.maximum(-1.3862943611198906 * lg2_approx(u1), 0.0))
    c, s = _cos_sin_approx(6.283185307179586 * u2)
    return radius * c, radius * s


@triton.jit
def normal32(r0, r1):
    """The first (cosine) draw of :func:`normal_pair`."""
    a, _ = normal_pair(r0, r1)
    return a


def meta(*shape: int, dtype: Any) -> Any:
    """An empty ``meta`` tensor: a launch's shapes and dtypes with no memory (the compile check
    and the cost model call the launchers on these)."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def torch_dtype(name: str) -> Any:
    """``fp32``, ``bf16``, ``fp16`` -> the torch dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
