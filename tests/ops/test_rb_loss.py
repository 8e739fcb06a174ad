"""The Rao-Blackwellized NELBO: closed form vs direct form, its gradient, and the fp32 path."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, impl_device

from duo_fast import reference as ref
from duo_fast.ops import rb_loss, rb_loss_linear


def _inputs(B, L, K, alpha, dtype=torch.float64, scale=3.0, per_token=False):
    logits = (torch.randn(B, L, K, dtype=torch.float64) * scale).to(dtype)
    x0 = torch.randint(0, K, (B, L))
    zt = torch.where(torch.rand(B, L) < 0.5, x0, torch.randint(0, K, (B, L)))
    zt[0, 0], x0[0, 0] = 1, 1            # both cases always present
    zt[0, 1], x0[0, 1] = 0, 1
    shape = (B, L) if per_token else (B,)
    a = torch.as_tensor(alpha, dtype=torch.float64).expand(shape).clone() if not callable(alpha) else alpha(shape)
    da = -torch.rand(shape, dtype=torch.float64) - 0.5
    return logits, zt, x0, a, da


@pytest.mark.parametrize("K", [2, 7, 100, 1000, 4099])
@pytest.mark.parametrize("per_token", [False, True])
def test_closed_form_equals_direct_float64(K, per_token):
    # alpha log-uniform in [1e-4, 1 - 1e-4] on both ends
    def alphas(shape):
        u = torch.rand(shape, dtype=torch.float64)
        lo = 10 ** (-4 + 3.7 * torch.rand(shape, dtype=torch.float64))
        return torch.where(u < 0.5, lo, 1 - lo)

    logits, zt, x0, a, da = _inputs(3, 17, K, alphas, per_token=per_token)
    closed = ref.rb_loss_ref(logits, zt, x0, a, da)
    direct = ref.rb_loss_direct_ref(logits, zt, x0, a, da)
    assert closed.shape == (3, 17)
    assert_close(closed, direct, atol=1e-10, rtol=1e-10, what=f"closed vs direct K={K}")
    assert (direct >= -1e-12).all()


@pytest.mark.parametrize("alpha", [1e-4, 0.2, 1 - 1e-4])
def test_closed_form_gradient_matches_autograd(alpha):
    logits, zt, x0, a, da = _inputs(2, 9, 50, alpha)
    g_out = torch.rand(2, 9, dtype=torch.float64)
    lg = logits.clone().requires_grad_()
    (ref.rb_loss_direct_ref(lg, zt, x0, a, da) * g_out).sum().backward()
    grad = ref.rb_loss_grad_ref(logits, zt, x0, a, da, g_out)
    assert_close(grad, lg.grad, atol=1e-9, rtol=1e-9, what="closed-form gradient")


def _rel_seq(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Worst relative error of the per-sequence sums (single tokens can have losses near 0)."""
    return ((got.double() - truth).sum(-1).abs() / truth.sum(-1).abs()).max().item()


def _rel_grad(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Worst relative error of the per-sequence gradient norms (first axis = sequence)."""
    return ((got.double() - truth).flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1)).max().item()


IMPLS = ["torch", "triton"]          # triton runs in the interpreter on this machine (conftest)

# alpha, loss tolerance (issue #4: 1e-5 inside [1e-3, 1 - 1e-3], 1e-4 at the ends)
ALPHAS = [(1e-4, 1e-4), (1e-3, 1e-5), (0.5, 1e-5), (1 - 1e-3, 1e-5), (1 - 1e-4, 1e-4)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [7, 1000, 3001])
def test_rb_loss_fp32_against_float64(impl, K):
    """Loss and gradient of the fp32 operator against the float64 direct form and its autograd,
    over the whole alpha range, per-sequence and per-token alpha, z_t = x and z_t != x."""
    B, L = 5, 23                                   # N = 115: not a multiple of any block size
    for per_tok in (False, True):
        for alpha, tol in ALPHAS:
            logits, zt, x0, a, da = _inputs(B, L, K, alpha, per_token=per_tok)
            if per_tok:                            # spread alpha per token around the grid point
                jitter = 0.1 * (torch.rand(B, L, dtype=torch.float64) - 0.5) * min(1.0, (1 - alpha) / alpha)
                a = (a * (1 + jitter)).clamp(1e-5, 1 - 1e-5)
            g_out = torch.rand(B, L, dtype=torch.float64)
            lg64 = logits.clone().requires_grad_()
            truth = ref.rb_loss_direct_ref(lg64, zt, x0, a, da)
            (truth * g_out).sum().backward()
            dev = impl_device(impl)
            lg = logits.float().to(dev).requires_grad_()
            got = rb_loss(lg, zt.to(dev), x0.to(dev), a.to(dev), da.to(dev), impl=impl, chunk_tokens=32)
            (got * g_out.float().to(dev)).sum().backward()
            got, lg = got.cpu(), lg.cpu()
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            err = _rel_seq(got, truth.detach())
            assert err <= tol, f"alpha={alpha} per_token={per_tok}: loss relative error {err:.2e} > {tol:.0e}"
            gerr = _rel_grad(lg.grad.cpu(), lg64.grad)
            assert gerr <= 1e-4, f"alpha={alpha} per_token={per_tok}: gradient relative error {gerr:.2e}"
            assert torch.isfinite(lg.grad.cpu()).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_rb_loss_large_vocabulary(impl):
    logits, zt, x0, a, da = _inputs(2, 6, 30522, lambda s: 10 ** (-3.5 * torch.rand(s, dtype=torch.float64)))
    truth = ref.rb_loss_direct_ref(logits, zt, x0, a, da)
    dev = impl_device(impl)
    got = rb_loss(logits.float().to(dev), zt.to(dev), x0.to(dev), a.to(dev), da.to(dev), impl=impl).cpu()
    assert _rel_seq(got, truth) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rb_loss_half_precision(impl, dtype):
    """bf16/fp16 logits: within 2e-2 of float64 on the same (upcast) values; gradient in the input dtype."""
    logits, zt, x0, a, da = _inputs(3, 19, 517, lambda s: 10 ** (-3 * torch.rand(s, dtype=torch.float64)))
    dev = impl_device(impl)
    lh = logits.to(dtype).to(dev).requires_grad_()
    lg64 = lh.detach().double().cpu().requires_grad_()
    truth = ref.rb_loss_direct_ref(lg64, zt, x0, a, da)
    truth.sum().backward()
    got = rb_loss(lh, zt.to(dev), x0.to(dev), a.to(dev), da.to(dev), impl=impl)
    got.sum().backward()
    assert lh.grad.dtype == dtype
    assert _rel_seq(got.cpu(), truth.detach()) <= 2e-2
    assert _rel_grad(lh.grad.cpu(), lg64.grad) <= 2e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_rb_loss_linear_against_float64(impl, bias):
    """The fused projection + loss: loss and d h, d weight, d bias against float64 autograd of
    ``linear`` then the direct-form loss; chunks that do not divide N; per-token alpha."""
    B, L, D, K = 3, 29, 45, 1001
    for alpha, tol in ALPHAS:
        _, zt, x0, a, da = _inputs(B, L, K, alpha, per_token=True)
        h = torch.randn(B, L, D, dtype=torch.float64)
        w = torch.randn(K, D, dtype=torch.float64) * 0.4
        b = torch.randn(K, dtype=torch.float64) if bias else None
        g_out = torch.rand(B, L, dtype=torch.float64)
        leaves64 = [t.clone().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
        truth = ref.rb_loss_direct_ref(torch.nn.functional.linear(*leaves64), zt, x0, a, da)
        (truth * g_out).sum().backward()
        dev = impl_device(impl)
        leaves = [t.float().to(dev).requires_grad_() for t in (h, w) + ((b,) if bias else ())]
        got = rb_loss_linear(leaves[0], leaves[1], leaves[2] if bias else None, zt.to(dev), x0.to(dev), a.to(dev),
                             da.to(dev), impl=impl, chunk_tokens=20)
        (got * g_out.float().to(dev)).sum().backward()
        assert _rel_seq(got.cpu(), truth.detach()) <= tol, f"alpha={alpha}"
        assert _rel_grad(leaves[0].grad.cpu(), leaves64[0].grad) <= 1e-4, f"d h at alpha={alpha}"
        for mine, theirs, name in zip(leaves[1:], leaves64[1:], ("weight", "bias")):
            err = ((mine.grad.double().cpu() - theirs.grad).norm() / theirs.grad.norm()).item()
            assert err <= 1e-4, f"d {name} at alpha={alpha}: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_rb_loss_linear_bf16(impl):
    B, L, D, K = 2, 33, 64, 700
    _, zt, x0, a, da = _inputs(B, L, K, lambda s: 10 ** (-3 * torch.rand(s, dtype=torch.float64)))
    dev = impl_device(impl)
    h = torch.randn(B, L, D).bfloat16().to(dev).requires_grad_()
    w = (torch.randn(K, D) * 0.3).to(dev).requires_grad_()    # fp32 master weight, used in bf16
    got = rb_loss_linear(h, w, None, zt.to(dev), x0.to(dev), a.to(dev), da.to(dev), impl=impl, chunk_tokens=16).cpu()
    got.sum().backward()
    h64 = h.detach().double().cpu().requires_grad_()
    w64 = w.detach().bfloat16().double().cpu().requires_grad_()
    truth = ref.rb_loss_direct_ref(h64 @ w64.T, zt, x0, a, da)
    truth.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert _rel_seq(got, truth.detach()) <= 2e-2
    assert _rel_grad(h.grad.cpu(), h64.grad) <= 2e-2
    assert ((w.grad.double().cpu() - w64.grad).norm() / w64.grad.norm()).item() <= 2e-2


def test_torch_and_triton_agree():
    """Same statistics by both implementations: the losses agree to float32 rounding."""
    logits, zt, x0, a, da = _inputs(4, 31, 2500, 0.3, dtype=torch.float32)
    dev = impl_device("triton")
    on_dev = [t.to(dev) for t in (logits, zt, x0, a, da)]
    assert_close(rb_loss(logits, zt, x0, a, da, impl="torch"), rb_loss(*on_dev, impl="triton").cpu(),
                 atol=1e-6, rtol=1e-5, what="torch vs triton")


@pytest.mark.parametrize("K", [37, 300, 2100])
def test_kernels_at_gpu_block_sizes(K):
    """The kernels at the block sizes the dispatcher picks on a GPU (small tiles, many programs),
    on shapes that are multiples of none of them: same statistics and gradient as the PyTorch path."""
    from duo_fast.kernels import rb_loss as kr
    from duo_fast.ops.rb_loss import grad_coefficients, grad_torch, stats_torch

    N = 45
    logits = torch.randn(N, K) * 3
    x0 = torch.randint(0, K, (N,))
    zt = torch.where(torch.rand(N) < 0.5, x0, torch.randint(0, K, (N,)))
    a = 10 ** (-4 * torch.rand(N, dtype=torch.float64))
    beta = (K * a / (1 - a)).float()
    dev = impl_device("triton")
    stats = kr.rb_stats(logits.to(dev), zt.to(dev), x0.to(dev), beta.to(dev),
                        blocks=kr.stats_blocks(K, interpret=False)).cpu()
    expect = stats_torch(logits, zt, x0, beta)
    used = torch.ones_like(stats, dtype=torch.bool)
    used[3] = beta <= 1                      # rem is only used (and only computed by torch) where beta <= 1
    assert used[3].any() and not used[3].all()
    assert_close(stats[used], expect[used], atol=1e-5, rtol=1e-5, what="stats")
    coefs = grad_coefficients(expect, zt == x0, a, -torch.ones_like(a), K, torch.ones_like(a))
    grad = kr.rb_grad(logits.to(dev), zt.to(dev), x0.to(dev), beta.to(dev), stats.to(dev), coefs.to(dev),
                      blocks=kr.grad_blocks(K, interpret=False)).cpu()
    assert_close(grad, grad_torch(logits, zt, x0, beta, expect, coefs), atol=1e-6, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_inputs_are_reported(impl):
    logits, zt, x0, a, da = (t.to(impl_device(impl)) for t in _inputs(2, 5, 50, 0.5, dtype=torch.float32))
    logits[1, 2, 7] = float("nan")
    assert not torch.isfinite(rb_loss(logits, zt, x0, a, da, impl=impl)).all()      # unchecked: propagates
    with pytest.raises(FloatingPointError, match="rb_loss: non-finite"):
        rb_loss(logits, zt, x0, a, da, impl=impl, check=True)
    h, w = torch.randn(2, 5, 8, device=logits.device), torch.randn(50, 8, device=logits.device)
    w[3, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="rb_loss_linear: non-finite values in h, weight or bias"):
        rb_loss_linear(h, w, None, zt, x0, a, da, impl=impl, check=True)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="must be"):
        rb_loss(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 0.5, -1.0)
    with pytest.raises(RuntimeError, match="out of range"):
        rb_loss(torch.randn(2, 3, 5), torch.full((2, 3), 5), torch.zeros(2, 3, dtype=torch.long), 0.5, -1.0)
    with pytest.raises(ValueError, match="weight"):
        rb_loss_linear(torch.randn(2, 3, 4), torch.randn(5, 6), None, torch.zeros(2, 3, dtype=torch.long),
                       torch.zeros(2, 3, dtype=torch.long), 0.5, -1.0)


def test_float64_inputs_are_refused_with_the_reference_named():
    z = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="float64.*rb_loss_ref"):
        rb_loss(torch.randn(1, 3, 7, dtype=torch.float64), z, z, 0.5, -1.0)
    with pytest.raises(ValueError, match="float64.*rb_loss_ref"):
        rb_loss_linear(torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(7, 4), None, z, z, 0.5, -1.0)


def test_cpu_fused_op_equals_the_pytorch_statistics_and_gradient():
    """csrc/rb_loss_cpu.cpp against the PyTorch path it replaces on CPU (same float32 arithmetic,
    fewer passes), at K not a multiple of the vector width, with rows at beta <= 1 (the rem term),
    z_t = x and z_t != x; and both against float64 sums."""
    import importlib

    R = importlib.import_module("duo_fast.ops.rb_loss")
    from duo_fast.ops import backends

    if not backends.rb_cpp_available():
        pytest.skip("the C++ op is not built or this CPU lacks AVX2/FMA")
    g = torch.Generator().manual_seed(0)
    for K in (4099, 50257):
        N = 21
        logits = torch.randn(N, K, generator=g) * 3
        zt = torch.randint(0, K, (N,), generator=g)
        x0 = torch.where(torch.rand(N, generator=g) < 0.5, zt, torch.randint(0, K, (N,), generator=g))
        a = 10 ** (-6 * torch.rand(N, generator=g, dtype=torch.float64))           # beta from ~0.05 to ~K^2
        beta = (K * a / (1 - a)).float()
        assert bool((beta <= 1).any()) and bool((beta > 1).any())
        s_t = R.stats_torch(logits, zt, x0, beta)
        s_c = torch.ops.duo_fast.rb_stats_cpu(logits, zt, x0, beta)
        # float64 values of the sums the statistics stand for
        p = torch.softmax(logits.double(), -1)
        x = beta.double()[:, None] * p
        exact = torch.stack([torch.logsumexp(logits.double(), -1), torch.log1p(x).sum(-1), (p / (1 + x)).sum(-1),
                             (x * p / (1 + x)).sum(-1)])
        for got in (s_t, s_c):
            err = ((got[[0, 4, 5, 6]].double() - exact).abs() / exact.abs().clamp_min(1e-30)).amax(1)
            assert bool((err < 1e-4).all()), err
        err_c = ((s_c[[4, 5, 6]].double() - exact[1:]).abs() / exact[1:].abs()).amax()
        err_t = ((s_t[[4, 5, 6]].double() - exact[1:]).abs() / exact[1:].abs()).amax()
        assert float(err_c) <= 2 * float(err_t) + 1e-6
        assert torch.equal(s_c[1:3], s_t[1:3])                                        # l_i, l_x exactly
        small = beta <= 1
        assert torch.allclose(s_c[3, small].double(), s_t[3, small].double(), rtol=1e-4, atol=1e-9)
        assert torch.allclose(s_c[7:], s_t[7:], rtol=1e-5)
        coefs = torch.randn(5, N, generator=g)
        g_t = R.grad_torch(logits, zt, x0, beta, s_t, coefs)
        g_c = torch.ops.duo_fast.rb_grad_cpu(logits, zt, x0, beta, s_t, coefs, torch.empty_like(logits))
        assert float((g_c - g_t).abs().max() / g_t.abs().max()) < 1e-5
        inplace = logits.clone()
        torch.ops.duo_fast.rb_grad_cpu(inplace, zt, x0, beta, s_t, coefs, inplace)
        assert torch.equal(inplace, g_c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gpu_blocks", [True, False])
def test_fused_gradient_recomputes_the_forward_logits_bit_for_bit(dtype, gpu_blocks):
    """The Triton path of rb_loss_linear: the forward's logits kernel and the backward's fused
    logits + gradient kernel compute each logit with the same code, so the fused gradient equals
    the elementwise gradient kernel applied to the stored logits exactly (bf16 tensor-core branch
    and fp32), at the GPU's tiles and the interpreter's, on shapes that are multiples of none."""
    from duo_fast.kernels import rb_loss as kr
    from duo_fast.ops.rb_loss import grad_coefficients

    N, K, D = 45, 150, 72
    g = torch.Generator().manual_seed(3)
    dev = impl_device("triton")
    h = torch.randn(N, D, generator=g).to(dtype).to(dev)
    w, b = (torch.randn(K, D, generator=g) * 0.3).to(dtype).to(dev), torch.randn(K, generator=g).to(dtype).to(dev)
    x0 = torch.randint(0, K, (N,), generator=g)
    zt = torch.where(torch.rand(N, generator=g) < 0.5, x0, torch.randint(0, K, (N,), generator=g))
    a = 10 ** (-4 * torch.rand(N, dtype=torch.float64, generator=g))
    beta = (K * a / (1 - a)).float()
    zt, x0, beta = zt.to(dev), x0.to(dev), beta.to(dev)
    blocks = kr.linear_blocks(D, dtype == torch.float32, interpret=not gpu_blocks)
    logits = kr.rb_logits_linear(h, w, b, blocks=blocks)
    assert logits.dtype == dtype and logits.shape == (N, kr.padded_vocab(K)) == (N, 256)
    assert torch.isinf(logits[:, K:]).all() and torch.isfinite(logits[:, :K]).all()
    truth = (h.double() @ w.double().T + b.double()).cpu()
    assert ((logits[:, :K].double().cpu() - truth).abs() <= truth.abs() * 2 ** -7 + 1e-5).all()
    stats = kr.rb_stats(logits, zt, x0, beta)
    coefs = grad_coefficients(stats.cpu(), (zt == x0).cpu(), a, -torch.ones_like(a), K, torch.ones_like(a)).to(dev)
    fused = kr.rb_grad_linear(h, w, b, zt, x0, beta, stats, coefs.contiguous(), blocks=blocks)
    assert torch.equal(fused, kr.rb_grad(logits, zt, x0, beta, stats, coefs.contiguous()))
    assert (fused[:, K:] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_rb_loss_linear_with_no_tokens_gives_zero_gradients(impl):
    """An empty batch: an empty loss, and gradients of exactly 0 (dW and db are written by the
    first chunk, so with no chunk they must still be zeros, not uninitialised memory)."""
    dev = impl_device(impl)
    K, D = 50, 16
    h = torch.randn(2, 0, D, device=dev, requires_grad=True)
    w = torch.randn(K, D, device=dev, requires_grad=True)
    b = torch.randn(K, device=dev, requires_grad=True)
    empty = torch.zeros(2, 0, dtype=torch.long, device=dev)
    loss = rb_loss_linear(h, w, b, empty, empty, 0.5, -1.0, impl=impl)
    assert loss.shape == (2, 0)
    (loss.sum() + 0 * w.sum() + 0 * b.sum()).backward()
    assert w.grad is not None and b.grad is not None
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
