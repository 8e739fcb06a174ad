"""Exact tails of the random draws (docs/math.md, "Random draws"). The Exp(1) and Box-Muller
maps are monotone functions of uniform integers, so the probability the generator gives to any
tail is a count of integers, computed here exactly by bisection and compared with the exact
law; the Triton helpers apply the same maps (checked value by value); and draws from both
streams hit moderate tails at the exact frequencies (4 sigma)."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE

from duo_fast import reference as ref
from duo_fast.kernels._common import exponential32, normal32


def _count_at_most(f, bits: int, y: float) -> int:
    """#{r in [0, 2^bits): f(r) <= y} for f increasing in r (an integer bisection)."""
    lo, hi = -1, (1 << bits) - 1                     # f(lo) <= y (virtually), f(hi) > y assumed
    if float(f(torch.tensor([hi]))[0]) <= y:
        return 1 << bits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if float(f(torch.tensor([mid]))[0]) <= y:
            lo = mid
        else:
            hi = mid
    return lo + 1


@pytest.mark.parametrize("bits", [31, 32])
def test_exponential_map_has_the_exact_tails(bits):
    f = lambda r: ref.exponential_from_bits(r, bits=bits)        # noqa: E731
    r = torch.arange(0, 1 << bits, (1 << bits) // 4096)
    e = f(r)
    assert (e.diff() >= 0).all(), "the map must be increasing for the tail counts to mean anything"
    lo, hi = float(f(torch.tensor([0]))[0]), float(f(torch.tensor([(1 << bits) - 1]))[0])
    assert lo < 3e-10 and hi > 22.1
    assert -math.log(lo) + math.log(hi) >= 25.0, "a Gumbel -log E must span at least 25 nats"
    n = 1 << bits
    for y in (1e-9, 1e-7, 1e-4, 0.5, 0.69, 0.7, 3.0, 10.0, 18.0, 21.0):
        exact = -math.expm1(-y)                                    # P(E <= y)
        got = _count_at_most(f, bits, y) / n
        assert abs(got - exact) <= 2.0 / n + 2e-6 * exact, (y, got, exact)
        upper = 1.0 - _count_at_most(f, bits, y) / n               # P(E > y) = exp(-y)
        assert abs(upper - math.exp(-y)) <= 2.0 / n + 2e-6 * math.exp(-y), (y, upper)


def test_box_muller_radius_reaches_6_5():
    """|eps| = R |cos|, R = sqrt(-2 log U): P(R > rho) = exp(-rho^2 / 2) by the integer count
    of the 31-bit U of kernels._common.normal32; R reaches 6.66."""
    def radius(r):
        u = (r.double() + 0.5) * 2.0 ** -31
        return -torch.sqrt(-2.0 * torch.log(u.float()))           # increasing in r
    n = 1 << 31
    assert -float(radius(torch.tensor([0]))[0]) > 6.6
    for rho in (3.0, 5.0, 6.0, 6.5):
        got = _count_at_most(radius, 31, -rho) / n                 # P(R >= rho)
        exact = math.exp(-rho * rho / 2)
        assert abs(got - exact) <= 2.0 / n + 1e-5 * exact, (rho, got, exact)


@triton.jit
def _apply_maps(w_ptr, e_ptr, g_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    w = tl.load(w_ptr + i, mask=m, other=0).to(tl.uint32)
    tl.store(e_ptr + i, exponential32(w), mask=m)
    tl.store(g_ptr + i, normal32(w, w * 0), mask=m)


def _triton_maps(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels._common.exponential32 and normal32 applied to given uint32 words (as int64)."""
    w = words.to(DEVICE)
    e, g = torch.empty(w.shape, device=DEVICE), torch.empty(w.shape, device=DEVICE)
    _apply_maps[(triton.cdiv(w.numel(), 1024),)](w, e, g, w.numel(), BLOCK=1024)
    return e.cpu(), g.cpu()


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="Triton needs CUDA or the interpreter")
def test_the_kernels_apply_the_same_maps():
    words = torch.cat([torch.arange(0, 64), torch.arange(2**31 - 64, 2**31 + 64), torch.arange(2**32 - 64, 2**32),
                       torch.randint(0, 2**32, (20_000,), generator=torch.Generator().manual_seed(0))])
    e, g = _triton_maps(words)
    want = ref.exponential_from_bits(words, bits=32)
    assert torch.allclose(e, want, rtol=2e-6, atol=0), (e - want).abs().max()
    assert float(e.max()) > 22.8 and float(e.min()) < 1.2e-10
    u1 = (((words >> 1).double() + 0.5) * 2.0 ** -31).float()      # the kernel's float32 arithmetic
    radius = torch.sqrt(-2.0 * torch.log(u1))
    assert torch.allclose(g, radius, rtol=1e-5, atol=1e-6), "angle 0: the draw is the radius"
    assert float(g.max()) > 6.6


def _poisson_ok(count: int, mean: float) -> bool:
    return abs(count - mean) <= 4 * math.sqrt(mean) + 1


def test_pytorch_stream_hits_the_tails_at_the_exact_rates():
    e = ref.exponential_draws((4_000_000,), generator=torch.Generator().manual_seed(3))
    g = -torch.log(e)
    n = e.numel()
    for y in (11.0, 13.0):                                         # P(g > y) = 1 - exp(-e^-y)
        assert _poisson_ok(int((g > y).sum()), n * -math.expm1(-math.exp(-y))), y
    assert _poisson_ok(int((g < -2.5).sum()), n * math.exp(-math.exp(2.5)))   # P(g < y) = exp(-e^-y)


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="Triton needs CUDA or the interpreter")
def test_the_posterior_kernel_draws_far_below_the_top():
    """Reduced end to end through the kernel's Gumbel: 2 ids 8 nats apart, the far one drawn at
    rate e^-8 / (1 + e^-8) = 3.4e-4 per draw (about 100 in 300k draws). The reach beyond 25
    nats is checked on the map above; the K = 50257, 20.5-nat draw is `make tails`."""
    from duo_fast.ops import sample_posterior

    n = 100_000
    logits = torch.tensor([0.0, -8.0]).expand(1, n, 2).contiguous().to(DEVICE)
    zt = torch.zeros(1, n, dtype=torch.long, device=DEVICE)
    got = 0
    for seed in range(3):
        out = sample_posterior(logits, zt, 1.0, 1e-9, seed=seed, impl="triton", final="ancestral")
        got += int((out == 1).sum())
    p = math.exp(-8) / (1 + math.exp(-8))
    assert _poisson_ok(got, 3 * n * p), (got, 3 * n * p)


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="Triton needs CUDA or the interpreter")
def test_the_logits_kernel_draws_a_far_group_at_its_rate():
    """The logits kernel's two-level draw (docs/math.md section 2): K = 256 is two interleaved
    groups of 128; the top id sits in one, every id of the other is 12 nats below it, so that
    group is drawn through the group Gumbel's tail at rate 128 e^-12 / (1 + 127 e^-12 + 128 e^-12)
    (about 8e-4 per draw, 80 in 100k)."""
    from duo_fast.kernels.sample_posterior import draw_block
    from duo_fast.ops import sample_posterior

    K, n = 256, 100_000
    assert draw_block(K) == K                      # one block, NJ = 2: group j holds ids 32a + 16j + l
    far = (torch.arange(K) % 32) >= 16             # group 1
    row = torch.full((K,), -12.0)
    row[0] = 0.0                                   # the top, in group 0
    logits = row.expand(1, n, K).contiguous().to(DEVICE)
    zt = torch.zeros(1, n, dtype=torch.long, device=DEVICE)
    out = sample_posterior(logits, zt, 1.0, 1e-9, seed=5, impl="triton", final="ancestral").cpu()
    p = 128 * math.exp(-12) / (1 + 255 * math.exp(-12))
    got = int(far[out[0]].sum())
    assert _poisson_ok(got, n * p), (got, n * p)
