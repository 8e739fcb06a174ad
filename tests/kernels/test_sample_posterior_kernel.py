"""The Triton posterior-sampling kernels (kernels/sample_posterior.py): both kernels draw the
exact posterior, the greedy fused-linear kernel equals the logits kernel, results do not depend
on block sizes, the random streams are independent, inputs are checked, and every configuration
compiles for Hopper (sm_90)."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, assert_binomial, chi_square_pvalue

from duo_fast import reference as ref
from duo_fast.kernels import sample_posterior as sp_kernels
from duo_fast.kernels._common import exponential32_log2e, lg2_approx
from duo_fast.kernels.sample_posterior import sample_posterior_fwd, sample_posterior_linear_fwd
from duo_fast.ops import sample_posterior, sample_posterior_linear


def _rows(N, a_s=0.6, a_t=0.3):
    return (torch.full((N,), a_s, dtype=torch.float64, device=DEVICE),
            torch.full((N,), a_t, dtype=torch.float64, device=DEVICE))


def _exact_linear_inputs(N, K, D, dtype):
    """Values on a 1/8 grid: every product and partial sum is exact in fp32 and bf16 x bf16 -> fp32,
    so the logits are bit-identical however the matmul is blocked."""
    g = torch.Generator().manual_seed(N * K + D)
    h = (torch.randint(-4, 5, (N, D), generator=g).float() / 8).to(dtype)
    w = (torch.randint(-4, 5, (K, D), generator=g).float() / 8).to(dtype)
    b = (torch.randint(-4, 5, (K,), generator=g).float() / 8).to(dtype)
    return h.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


# every shape, dtype and bias flag appears (not the full cross product, to keep the interpreter time down)
@pytest.mark.parametrize("N,K,D,dtype,bias", [(50, 37, 20, torch.float32, True), (70, 130, 40, torch.bfloat16, True),
                                              (16, 7, 64, torch.float32, False), (50, 300, 20, torch.bfloat16, False)])
def test_greedy_linear_kernel_equals_logits_kernel(N, K, D, dtype, bias):
    h, w, b = _exact_linear_inputs(N, K, D, dtype)
    logits = (h.float() @ w.float().T + (b.float() if bias else 0)).contiguous()
    zt = torch.randint(0, K, (N,), device=DEVICE)
    a_s, a_t = _rows(N)
    via_logits = sample_posterior_fwd(logits, zt, a_s, a_t, None, 1234, 2)
    fused = sample_posterior_linear_fwd(h, w, b if bias else None, zt, a_s, a_t, None, 1234, 2)
    assert torch.equal(via_logits, fused)
    assert torch.equal(fused, logits.argmax(-1))


# The two kernels draw differently (one Gumbel per id in the fused-linear kernel, one per group
# and one per id of the chosen group in the logits kernel): both against the exact posterior.
@pytest.mark.parametrize("kernel", ["logits", "linear"])
@pytest.mark.parametrize("final,psi", [(0, True), (1, False)])
def test_both_kernels_draw_the_exact_posterior(kernel, final, psi):
    K, D, n = 300, 16, 20_000                   # three groups of the logits kernel, the last one partial
    g = torch.Generator().manual_seed(final)
    h = torch.randn(1, D, generator=g)
    w = torch.randn(K, D, generator=g) * 0.3
    w[256:] += 0.2 * h                          # group masses about 0.13, 0.16, 0.7 (the last one partial)
    logits = (h @ w.T)[0]
    if kernel == "logits":                      # bf16, as a model's logits come (fp32: tests/ops/test_posterior.py)
        logits = logits.bfloat16()
    i = int(logits.argmax())
    a_s, a_t = (1.0, 1e-6) if final == 1 else (0.7, 0.4)
    kappa = 0.3 if psi else None
    x = logits.double().softmax(-1)[None, None]
    zt = torch.tensor([[i]])
    exact = ref.posterior_ref(x, zt, a_s, a_t)[0, 0]
    if psi:
        exact = kappa * exact + (1 - kappa) * (a_s * ref.posterior_ref(x, zt, 1.0, a_t)[0, 0] + (1 - a_s) / K)
    rows = torch.full((n,), i, device=DEVICE)
    s_, t_ = (torch.full((n,), v, dtype=torch.float64, device=DEVICE) for v in (a_s, a_t))
    kap = torch.full((n,), kappa, dtype=torch.float64, device=DEVICE) if psi else None
    if kernel == "logits":
        draws = sample_posterior_fwd(logits.expand(n, K).contiguous().to(DEVICE), rows, s_, t_, kap, 77, final)
    else:
        draws = sample_posterior_linear_fwd(h.expand(n, D).contiguous().to(DEVICE), w.to(DEVICE), None, rows, s_, t_,
                                            kap, 77, final)
    assert chi_square_pvalue(draws.cpu(), exact) > 1e-3


@pytest.mark.parametrize("K", [5, 300, 2500])
def test_results_do_not_depend_on_block_sizes(K):
    N = 40
    logits = torch.randn(N, K, device=DEVICE)
    zt = torch.randint(0, K, (N,), device=DEVICE)
    a_s, a_t = _rows(N)
    base = sample_posterior_fwd(logits, zt, a_s, a_t, None, 7, 0)
    bk = sp_kernels.draw_block(K)
    for blocks in [(1, bk), (2, bk), (16, bk), sp_kernels.logits_blocks(K, interpret=False)]:   # the last: a GPU launch
        assert torch.equal(sample_posterior_fwd(logits, zt, a_s, a_t, None, 7, 0, blocks=blocks), base), blocks


@triton.jit
def _tile_and_elementwise(g_ptr, want_ptr, seed, k0, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = k0 + tl.arange(0, BLOCK_K)
    out = rows[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(g_ptr + out, sp_kernels._gumbel_tile(seed, rows, k0, BLOCK_M, BLOCK_K))
    c0 = cols[None, :] // 4 + rows[:, None] * 0
    c1 = rows[:, None] + cols[None, :] * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c0 * 0, c0 * 0)
    w = cols[None, :] % 4
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    tl.store(want_ptr + out, -lg2_approx(exponential32_log2e(r)))


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="Triton needs CUDA or the interpreter")
def test_noise_of_id_c_is_word_c_mod_4_of_counter_c_div_4():
    """The documented stream (kernels/sample_posterior.py): one Philox call per four ids, laid
    out by the double join exactly as the element-by-element definition says."""
    for k0, bm, bk in ((0, 2, 16), (4096, 4, 64)):
        g, want = (torch.empty(bm, bk, device=DEVICE) for _ in range(2))
        _tile_and_elementwise[(1,)](g, want, 987654321, k0, BLOCK_M=bm, BLOCK_K=bk)
        assert torch.equal(g, want)
        assert g.unique().numel() == bm * bk             # four different words, not one repeated


def test_streams_are_independent_across_rows_and_seeds():
    # uniform logits, z_t = 0, mostly "draw from x_theta": draws should be iid over 8 ids
    K, N = 8, 20_000
    logits = torch.zeros(N, K, device=DEVICE)
    zt = torch.zeros(N, dtype=torch.long, device=DEVICE)
    a_s, a_t = _rows(N, 0.999, 0.001)
    one = sample_posterior_fwd(logits, zt, a_s, a_t, None, 11, 0).cpu()
    two = sample_posterior_fwd(logits, zt, a_s, a_t, None, 12, 0).cpu()
    p = ref.posterior_ref(torch.full((1, 1, K), 1.0 / K, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.long),
                          0.999, 0.001)[0, 0]
    assert chi_square_pvalue(one, p) > 1e-3
    match = float((p * p).sum())                     # P(two independent draws agree)
    assert_binomial(int((one[1:] == one[:-1]).sum()), N - 1, match, what="neighbouring rows")
    assert_binomial(int((one == two).sum()), N, match, what="two seeds")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_linear_dispatch_draws_from_the_posterior(impl):
    K, D, n = 50, 24, 30_000
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, 1, D, generator=g)
    w, b = torch.randn(K, D, generator=g) * 0.5, torch.randn(K, generator=g)
    logits = (h @ w.T + b)[0, 0]
    zt = torch.tensor([[int(logits.argmax())]])
    exact = ref.posterior_ref(logits.double().softmax(-1)[None, None], zt, 0.8, 0.5)[0, 0]
    draws = sample_posterior_linear(h.expand(1, n, D).contiguous().to(DEVICE), w.to(DEVICE), b.to(DEVICE),
                                    zt.expand(1, n).contiguous().to(DEVICE), 0.8, 0.5, seed=3, impl=impl)[0].cpu()
    assert chi_square_pvalue(draws, exact) > 1e-3


def test_dispatch_checks_inputs():
    with pytest.raises(ValueError, match="final must be"):
        sample_posterior(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), 0.5, 0.2, final="sideways")
    with pytest.raises(ValueError, match="zt"):
        sample_posterior(torch.randn(1, 2, 5), torch.zeros(1, 3, dtype=torch.long), 0.5, 0.2)
    with pytest.raises(ValueError, match="float64"):
        sample_posterior_fwd(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.ones(3), None,
                             0, 0)
    with pytest.raises(ValueError, match="weight"):
        sample_posterior_linear_fwd(torch.randn(3, 4), torch.randn(5, 3), None, torch.zeros(3, dtype=torch.long),
                                    *_rows(3), None, 0, 0)
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            sample_posterior(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), 0.5, 0.2, impl="triton")

