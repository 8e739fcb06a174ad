"""relaxed_embedding (dense, sparse, topk) and coupled_latents against the float64 reference
(explicit noise), the T operator (statistics of the RNG path), and autograd (d embedding)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_binomial, impl_device

from duo_fast import TTable
from duo_fast import reference as ref
from duo_fast.ops import coupled_latents, relaxed_embedding, relaxed_torch

IMPLS = ["torch", "triton"]          # triton runs in the interpreter on this machine (conftest)


def p_of(table: TTable, gamma: float) -> float:
    """P(argmax w = x) from the table: alpha + (1 - alpha)/K."""
    a = float(table.alpha(torch.tensor([gamma], dtype=torch.float64))[0])
    return a + (1 - a) / table.vocab_size


def _rel_rows(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Worst relative error of a row (norm over the last axis)."""
    return ((got.double() - truth).norm(dim=-1) / truth.norm(dim=-1)).max().item()


def _case(B, L, K, D, dtype=torch.float64, per_token=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, K, (B, L), generator=g)
    shape = (B, L) if per_token else (B,)
    gamma = -3.5 + 2.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    E = torch.randn(K, D, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(B, L, K, generator=g, dtype=torch.float64)
    return x0, gamma, E, eps


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("tau", [1.0, 1e-1, 1e-3])
def test_matches_float64_reference_fp32(impl, mode, tau):
    """fp32 embedding with the exact fp32 product (``ieee``), explicit noise: h0 within 1e-5
    relative per token, z_t exact, d embedding within 1e-5 of autograd on the reference; B*L, K, D
    multiples of no block size."""
    for (B, L, K, D, per_tok) in [(2, 37, 300, 40, False), (3, 7, 1031, 130, True)]:
        x0, gamma, E, eps = _case(B, L, K, D, per_token=per_tok, seed=K)
        E64 = E.clone().requires_grad_()
        h_ref, z_ref = ref.relaxed_embedding_ref(x0, gamma, tau, E64, eps=eps)
        dh = torch.randn_like(h_ref)
        (h_ref * dh).sum().backward()
        dev = impl_device(impl)
        E32 = E.float().to(dev).requires_grad_()
        h, z = relaxed_embedding(x0.to(dev), gamma.to(dev), tau, E32, seed=0, mode=mode, eps=eps.float().to(dev),
                                 impl=impl, chunk_tokens=19, ieee=True)
        (h * dh.float().to(dev)).sum().backward()
        h, z, E32 = h.cpu(), z.cpu(), E32.cpu()
        assert h.dtype == torch.float32 and h.shape == (B, L, D)
        assert torch.equal(z, z_ref), f"z_t differs (K={K})"
        assert _rel_rows(h, h_ref.detach()) <= 1e-5, f"h0 K={K}: {_rel_rows(h, h_ref.detach()):.2e}"
        gerr = ((E32.grad.double().cpu() - E64.grad).norm() / E64.grad.norm()).item()
        assert gerr <= 1e-5, f"d embedding K={K}: {gerr:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_matches_float64_reference_bf16(impl, mode):
    x0, gamma, E, eps = _case(2, 19, 517, 72, seed=3)
    dev = impl_device(impl)
    Eb = E.bfloat16().to(dev).requires_grad_()
    E64 = Eb.detach().double().cpu().requires_grad_()
    h_ref, z_ref = ref.relaxed_embedding_ref(x0, gamma, 1e-1, E64, eps=eps)
    h_ref.sum().backward()
    h, z = relaxed_embedding(x0.to(dev), gamma.to(dev), 1e-1, Eb, seed=0, mode=mode, eps=eps.float().to(dev), impl=impl)
    h.float().sum().backward()
    assert h.dtype == torch.bfloat16 and Eb.grad.dtype == torch.bfloat16
    assert torch.equal(z.cpu(), z_ref)
    assert _rel_rows(h.cpu(), h_ref.detach()) <= 2e-2
    assert ((Eb.grad.double().cpu() - E64.grad).norm() / E64.grad.norm()).item() <= 2e-2


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("tau", [1e-1, 1e-3])
def test_bf16_branch_error_is_within_twice_pytorch_bf16(mode, tau):
    """The kernels' bf16 branch (bf16 loads, the weights cast to bf16, a bf16 x bf16 -> fp32 dot,
    bf16 stores: the code an H100 runs; only the dot is emulated in the interpreter) against the
    float64 reference: its error is at most twice that of the same computation in PyTorch bf16
    (softmax weights cast to bf16, bf16 matmul), for h0 and for d embedding."""
    x0, gamma, E, eps = _case(2, 23, 601, 72, seed=11)
    dev = impl_device("triton")
    Eb = E.bfloat16()
    E64 = Eb.double().requires_grad_()
    dh = torch.randn(2, 23, 72, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).bfloat16()
    h_ref, _ = ref.relaxed_embedding_ref(x0, gamma, tau, E64, eps=eps)
    (h_ref * dh.double()).sum().backward()
    # the same computation in PyTorch bf16
    w = ref.gaussian_latents_ref(x0, gamma, 601, eps=eps, dtype=torch.float64)
    P = torch.softmax(w / tau, dim=-1).bfloat16()
    h_torch = P @ Eb
    dE_torch = (P.reshape(-1, 601).transpose(0, 1) @ dh.reshape(-1, 72)).float()
    Ek = Eb.clone().to(dev).requires_grad_()
    h, _ = relaxed_embedding(x0.to(dev), gamma.to(dev), tau, Ek, seed=0, mode=mode, eps=eps.float().to(dev),
                             impl="triton")
    (h.float() * dh.float().to(dev)).sum().backward()
    assert h.dtype == torch.bfloat16 and Ek.grad.dtype == torch.bfloat16

    def err(x, truth):
        return ((x.double().cpu() - truth).norm() / truth.norm()).item()

    h_truth, g_truth = h_ref.detach(), E64.grad
    for what, ours, theirs in (("h0", err(h, h_truth), err(h_torch, h_truth)),
                               ("d embedding", err(Ek.grad, g_truth), err(dE_torch.bfloat16(), g_truth))):
        assert ours <= 2 * theirs + 1e-7, f"{what}: kernel {ours:.2e} vs PyTorch bf16 {theirs:.2e}"


@pytest.mark.parametrize("ieee", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_kernels_at_gpu_block_sizes(sparse, ieee):
    """The kernels at the tiles the dispatcher picks on a GPU (many small programs), explicit noise,
    several token chunks, an fp32 embedding: with ``ieee`` the exact fp32 product (1e-5); by
    default bf16 tensor cores, whose error is at most twice PyTorch's bf16 product's."""
    from duo_fast.kernels import relaxed_embedding as kr

    N, K, D, tau = 170, 150, 72, 0.05
    x0, gamma, E, eps = _case(1, N, K, D, seed=7)
    at, st = (t.float().reshape(-1).contiguous() for t in ref.gaussian_coefficients(gamma.expand(1, N)))
    h_ref, z_ref = ref.relaxed_embedding_ref(x0, gamma, tau, E, eps=eps)
    dev = impl_device("triton")
    e32 = eps.reshape(N, K).float().contiguous().to(dev)
    x0d, atd, std = x0.reshape(-1).to(dev), at.to(dev), st.to(dev)
    blocks = (kr.fwd_blocks(N, K, D, interpret=False, ieee=ieee), kr.stats_blocks(K, interpret=False))
    h, z, norm = kr.relaxed_fwd(x0d, atd, std, E.float().to(dev), tau, 0, sparse, e32, blocks=blocks, ieee=ieee,
                                chunk=kr.PAD)
    assert torch.equal(z.cpu(), z_ref.reshape(-1))
    dh = torch.randn(N, D, dtype=torch.float64)
    de = kr.relaxed_bwd(x0d, atd, std, norm, dh.float().to(dev), K, tau, 0, sparse, e32,
                        blocks=kr.bwd_blocks(N, K, D, interpret=False, ieee=ieee), ieee=ieee, chunk=kr.PAD).cpu()
    w = ref.gaussian_latents_ref(x0, gamma, K, eps=eps).reshape(N, K)
    P = torch.softmax(w / tau, -1)
    de_ref = P.T @ dh

    def err(x, truth):
        return ((x.double().cpu() - truth).norm() / truth.norm()).item()

    if ieee:
        assert _rel_rows(h.cpu(), h_ref.reshape(N, D)) <= 1e-5
        assert err(de, de_ref) <= 1e-5
    else:
        Pb = P.bfloat16().double()
        h_torch, de_torch = Pb @ E.bfloat16().double(), Pb.T @ dh.float().bfloat16().double()
        assert err(h, h_ref.reshape(N, D)) <= 2 * err(h_torch, h_ref.reshape(N, D)) + 1e-7
        assert err(de, de_ref) <= 2 * err(de_torch, de_ref) + 1e-7


def test_sparse_drops_at_most_the_stated_mass():
    """At tau = 1e-3 the sparse kernel skips almost every tile, and the result stays within the
    1e-6 bound: h0 of an all-ones embedding column is the kept weight, >= 1 - 1e-6 (the exact fp32
    product, so that only the dropping is measured; the flags show the skipping)."""
    from duo_fast.kernels import relaxed_embedding as kr

    N, K = 64, 4096
    dev = impl_device("triton")
    x0 = torch.randint(0, K, (1, N), device=dev)
    E = torch.ones(K, 16, device=dev)
    h, _ = relaxed_embedding(x0, torch.tensor([-2.0], device=dev), 1e-3, E, seed=5, mode="sparse", impl="triton",
                             ieee=True)
    assert ((h[..., 0] - 1).abs() <= 1e-6 + 1e-6).all()
    at, st = (t.float().reshape(-1).contiguous() for t in ref.gaussian_coefficients(torch.full((1, N), -2.0)))
    xs, at, st = x0.reshape(-1), at.to(dev), st.to(dev)
    _, norm = kr.relaxed_stats(xs, at, st, K, 1e-3, 5)
    buf = torch.empty(kr.PAD, K, device=dev)
    flags = torch.empty(kr.PAD // kr.FLAG_BLOCK, K // kr.FLAG_BLOCK, dtype=torch.int8, device=dev)
    kr.probs(xs, at, st, norm, K, 1e-3, 5, True, 0, N, buf, flags)
    assert 0 < int(flags.sum()) <= 2 * N, "at most a couple of non-empty tiles per token"


@pytest.mark.parametrize("impl,mode", [(i, m) for i in IMPLS for m in ("dense", "sparse")] + [("torch", "topk")])
def test_argmax_frequency_matches_T(impl, mode):
    """RNG path: P(z_t = x) against T (binomial, 4 sigma) at two noise levels. (topk has one
    implementation, O(k) per token in PyTorch on any device.)"""
    K, D, n = 64, 16, 6000
    table = TTable.build(K)
    dev = impl_device(impl)
    E = torch.randn(K, D, device=dev)
    for i, gamma in enumerate((-3.0, -1.5)):
        x0 = torch.randint(0, K, (3, n // 3), generator=torch.Generator().manual_seed(i)).to(dev)
        _, z = relaxed_embedding(x0, gamma, 0.1, E, seed=100 + i, mode=mode, impl=impl, k=2)
        assert_binomial(int((z == x0).sum()), n, p_of(table, gamma), what=f"{mode}/{impl} gamma={gamma}")


def _recovered_noise(impl: str, seed: int, x0: torch.Tensor, gamma: float) -> torch.Tensor:
    """With E = I and tau = 1, h0 = softmax(w): log h0 recovers w up to a per-token constant,
    hence eps = (w - at e_x) / st up to that constant; returned centred per token (N, K)."""
    K = 32
    dev = impl_device(impl)
    h, _ = relaxed_embedding(x0.to(dev), gamma, 1.0, torch.eye(K, device=dev), seed=seed, mode="dense", impl=impl)
    h = h.cpu()
    at, st = (float(t) for t in ref.gaussian_coefficients(torch.tensor(gamma, dtype=torch.float64)))
    w = h.double().log().reshape(-1, K)
    w = w - torch.nn.functional.one_hot(x0.reshape(-1), K) * at
    eps = w / st
    return eps - eps.mean(-1, keepdim=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_noise_is_standard_normal_and_uncorrelated(impl):
    """The generated noise, recovered exactly through E = I: centred-normal moments, no
    correlation between neighbouring tokens, none between two seeds; same seed, same values."""
    K, n = 32, 400
    x0 = torch.randint(0, K, (2, n // 2), generator=torch.Generator().manual_seed(1))
    e1 = _recovered_noise(impl, 11, x0, -2.0)
    # centred over K iid N(0,1): each entry has variance (K - 1)/K
    var = (e1 ** 2).mean().item()
    m = e1.numel()
    assert abs(var - (K - 1) / K) <= 4 * math.sqrt(2 / m) * 1.05, f"variance {var:.4f}"
    kurt = ((e1 ** 4).mean() / (e1 ** 2).mean() ** 2).item()
    assert abs(kurt - 3) < 0.25, f"kurtosis {kurt:.3f}"

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    z = 4 / math.sqrt(e1[:-1].numel())
    assert abs(corr(e1[:-1], e1[1:])) < z, "noise correlated across neighbouring tokens"
    # centring within a token correlates its own entries by exactly -1/(K - 1), nothing more
    assert abs(corr(e1[:, :-1], e1[:, 1:]) + 1 / (K - 1)) < z, "noise correlated across neighbouring ids"
    e2 = _recovered_noise(impl, 12, x0, -2.0)
    assert abs(corr(e1, e2)) < z, "noise correlated across seeds"
    assert torch.allclose(_recovered_noise(impl, 11, x0, -2.0), e1, atol=0, rtol=0), "same seed, other noise"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_backward_regenerates_the_forward_noise(impl, mode):
    """RNG path (no explicit noise): d embedding equals softmax(w/tau)^T dh for the w of the
    forward, which with E = I is the forward's own output h0 = softmax(w/tau)."""
    K, N = 40, 50
    dev = impl_device(impl)
    x0 = torch.randint(0, K, (1, N), device=dev)
    E = torch.eye(K, device=dev, requires_grad=True)
    h, _ = relaxed_embedding(x0, -2.5, 0.3, E, seed=9, mode=mode, impl=impl, ieee=True)    # exact fp32 products
    dh = torch.randn(1, N, K, device=dev)
    (h * dh).sum().backward()
    expect = h.detach()[0].double().T @ dh[0].double()
    assert ((E.grad.double() - expect).norm() / expect.norm()).item() <= 1e-5


def test_topk_mode_matches_reference_and_gradient():
    K, D, k = 300, 24, 3
    x0 = torch.randint(0, K, (2, 33))
    gamma = torch.tensor([-3.0, -2.0], dtype=torch.float64)
    E = torch.randn(K, D, dtype=torch.float64, requires_grad=True)
    h, z = relaxed_embedding(x0, gamma, 1e-2, E, seed=4, mode="topk", k=k)
    idx, weights, z_ref = relaxed_torch.topk_relaxation(x0, gamma, 1e-2, K, k, generator=torch.Generator().manual_seed(4))
    h_ref = torch.einsum("blk,blkd->bld", weights, E.detach()[idx])
    assert torch.equal(z, z_ref)
    assert _rel_rows(h.detach(), h_ref) <= 1e-12
    dh = torch.randn_like(h)
    (h * dh).sum().backward()
    expect = torch.zeros(K, D, dtype=torch.float64).index_add_(0, idx.reshape(-1),
                                                               (weights[..., None] * dh[..., None, :]).reshape(-1, D))
    assert torch.allclose(E.grad, expect, atol=1e-12)


def test_same_seed_same_result_other_seed_other_result():
    K, D = 200, 8
    x0 = torch.randint(0, K, (2, 30))
    E = torch.randn(K, D)
    for mode in ("dense", "sparse", "topk"):
        a = relaxed_embedding(x0, -2.0, 0.1, E, seed=3, mode=mode)
        b = relaxed_embedding(x0, -2.0, 0.1, E, seed=3, mode=mode)
        c = relaxed_embedding(x0, -2.0, 0.1, E, seed=4, mode=mode)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])


def test_coupled_latents_marginals_and_coupling():
    K, n = 100, 20000
    table = TTable.build(K)
    x0 = torch.randint(0, K, (4, n // 4))
    g_t, g_s = -1.5, -2.5                        # s < t: less noise at s
    zt, zs = coupled_latents(x0, g_t, g_s, K, seed=1)
    assert_binomial(int((zt == x0).sum()), n, p_of(table, g_t), what="P(z_t = x)")
    assert_binomial(int((zs == x0).sum()), n, p_of(table, g_s), what="P(z_s = x)")
    # one shared eps: z_t = x implies z_s = x; both wrong implies the same wrong id
    assert (zs[zt == x0] == x0[zt == x0]).all()
    both = (zt != x0) & (zs != x0)
    assert torch.equal(zt[both], zs[both])
    z2 = coupled_latents(x0, g_t, g_s, K, seed=1)
    assert torch.equal(z2[0], zt) and torch.equal(z2[1], zs)


def test_bad_inputs_are_errors():
    x0 = torch.zeros(2, 3, dtype=torch.long)
    E = torch.randn(10, 4)
    with pytest.raises(ValueError, match="mode"):
        relaxed_embedding(x0, -2.0, 0.1, E, seed=0, mode="approx")
    with pytest.raises(ValueError, match="tau"):
        relaxed_embedding(x0, -2.0, 0.0, E, seed=0)
    with pytest.raises(RuntimeError, match="out of range"):
        relaxed_embedding(x0 + 10, -2.0, 0.1, E, seed=0)
    with pytest.raises(ValueError, match="eps"):
        relaxed_embedding(x0, -2.0, 0.1, E, seed=0, eps=torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="x0"):
        coupled_latents(x0.float(), -2.0, -3.0, 10, seed=0)
