"""The interpreter runs the kernels' bf16 branch as the GPU does: ``kernels._common.cast`` rounds
fp32 -> bf16 to nearest even (Triton's interpreter alone truncates), and ``mma`` computes the
bf16 x bf16 -> fp32 product of the same bf16 values (the interpreter's own bf16 dot is wrong)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from duo_fast.kernels._common import cast, interpreting, mma

pytestmark = pytest.mark.skipif(not interpreting(), reason="checks the interpreter's emulation")


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N, EMULATE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < N
    tl.store(y_ptr + i, cast(tl.load(x_ptr + i, mask=m), tl.bfloat16, EMULATE), mask=m)


@triton.jit
def _mma_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, EMULATE: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    acc = mma(a, b, tl.zeros((M, N), tl.float32), False, EMULATE)
    tl.store(c_ptr + m[:, None] * N + n[None, :], acc)


def test_cast_rounds_to_nearest_even_like_the_gpu():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3000, generator=g) * 10 ** torch.randint(-6, 6, (3000,), generator=g).float(),
                   torch.tensor([0.99997, 1 + 2**-9, 1 + 3 * 2**-9, -(1 + 2**-9), 0.0, -0.0, 1e38])])
    x = x[(x == 0) | (x.abs() >= torch.finfo(torch.float32).tiny)]   # subnormals: the interpreter's own
    # conversion of them differs, and no kernel value that matters is below 1e-38
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), EMULATE=True, BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(y, x.bfloat16())                       # torch rounds to nearest even, as cvt.rn does
    _cast_kernel[(1,)](x, y, x.numel(), EMULATE=False, BLOCK=triton.next_power_of_2(x.numel()))
    assert not torch.equal(y, x.bfloat16())                    # the interpreter's own cast truncates


def test_mma_is_the_bf16_product_with_fp32_accumulation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 32, generator=g).bfloat16(), torch.randn(32, 16, generator=g).bfloat16()
    c = torch.empty(16, 16)
    _mma_kernel[(1,)](a, b, c, M=16, N=16, K=32, EMULATE=True)
    want = a.double() @ b.double()
    assert (c.double() - want).abs().max() <= 1e-5 * want.abs().max()
