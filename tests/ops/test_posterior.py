"""The reverse posterior (section 2): Bayes' rule, and exact sampling by the three-part mixture."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_close, chi_square_pvalue

from duo_fast import reference as ref
from duo_fast.ops import sample_posterior


@pytest.mark.parametrize("K", [3, 17, 256])
@pytest.mark.parametrize("onehot", [True, False])
def test_posterior_equals_bayes(K, onehot):
    n = 40
    if onehot:
        x = torch.nn.functional.one_hot(torch.randint(0, K, (n,)), K).double()
    else:
        x = torch.randn(n, K, dtype=torch.float64).softmax(-1)
    zt = torch.randint(0, K, (n,))
    zt[: n // 4] = x[: n // 4].argmax(-1)
    for a_s, a_t in [(0.9, 0.3), (0.5, 0.499), (1.0, 1e-3), (1e-3, 1e-4)]:
        post = ref.posterior_ref(x[None], zt[None], a_s, a_t)[0]
        bayes = ref.posterior_bayes_ref(x, zt, a_s, a_t)
        assert_close(post, bayes, atol=1e-12, rtol=1e-10, what=f"posterior a_s={a_s} a_t={a_t}")
        assert_close(post.sum(-1), torch.ones(n, dtype=torch.float64), atol=1e-12, rtol=0, what="row sums")
        assert (post >= 0).all()


IMPLS = ["torch", "triton"]          # "triton" runs in the interpreter on CPU, on the GPU with CUDA


def _draws(sampler, logits, zt, a_s, a_t, n, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    rows = logits.reshape(1, 1, -1).expand(1, n, logits.shape[-1])      # (1, n, K): n draws of one token
    return sampler(rows.contiguous().to(DEVICE), zt.expand(1, n).contiguous().to(DEVICE), a_s, a_t, generator=gen,
                   **kw)[0].cpu()


def _n(K, impl):
    """Draws per test: fewer for the interpreter at K = 1000 (it is slow), still enough for chi-square."""
    return 10_000 if (impl == "triton" and K >= 1000 and DEVICE.type == "cpu") else 60_000


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [7, 64, 1000])
@pytest.mark.parametrize("at_argmax", [True, False])
@pytest.mark.parametrize("a_s,a_t", [(0.5, 0.2), (1 - 1 / 1024 * 0.3, 1 - 1 / 1024 * 0.3 - 1 / 1024), (0.99, 1e-3)])
def test_mixture_sampler_matches_exact_posterior(impl, K, at_argmax, a_s, a_t):
    logits = torch.randn(1, 1, K) * 2
    i = int(logits.argmax()) if at_argmax else int(logits.argmin())
    zt = torch.tensor([[i]])
    exact = ref.posterior_ref(logits.double().softmax(-1), zt, a_s, a_t)[0, 0]
    draws = _draws(sample_posterior, logits, zt, a_s, a_t, _n(K, impl), seed=K, impl=impl)
    assert chi_square_pvalue(draws, exact) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("final", ["ancestral", "greedy"])
def test_final_steps(impl, final):
    K = 64
    logits = torch.randn(1, 1, K) * 2
    zt = torch.tensor([[5]])
    draws = _draws(sample_posterior, logits, zt, 1.0, 1e-5, 40_000, seed=1, final=final, impl=impl)
    if final == "greedy":
        assert (draws == logits.argmax()).all()
    else:
        exact = ref.posterior_ref(logits.double().softmax(-1), zt, 1.0, 1e-5)[0, 0]
        assert chi_square_pvalue(draws, exact) > 1e-3


def test_dense_reference_sampler_matches_exact_posterior():
    K = 64
    logits = torch.randn(1, 1, K) * 2
    zt = torch.tensor([[int(logits.argmax())]])
    exact = ref.posterior_ref(logits.double().softmax(-1), zt, 0.6, 0.3)[0, 0]
    draws = _draws(ref.sample_posterior_dense_ref, logits, zt, 0.6, 0.3, 40_000, seed=2)
    assert chi_square_pvalue(draws, exact) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_seeds_reproduce_and_differ(impl):
    logits = torch.randn(2, 16, 50, device=DEVICE)
    zt = torch.randint(0, 50, (2, 16), device=DEVICE)
    a = sample_posterior(logits, zt, 0.6, 0.3, seed=3, impl=impl)
    b = sample_posterior(logits, zt, 0.6, 0.3, seed=3, impl=impl)
    c = sample_posterior(logits, zt, 0.6, 0.3, seed=4, impl=impl)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("a_s,a_t,kappa", [(0.7, 0.4, 0.0), (0.7, 0.4, 0.4), (0.9, 0.9, 0.2), (0.35, 0.3, 0.0),
                                           (0.999, 0.6, 0.7)])
def test_psi_sampler_matches_exact_mixture(impl, a_s, a_t, kappa):
    """Including s = t (the corrector steps of a Psi schedule's constant phase), where the plain
    posterior stays at z_t and only the (1 - kappa) part moves."""
    K = 64
    logits = torch.randn(1, 1, K) * 2
    zt = torch.tensor([[int(logits.argmax())]])
    x = logits.double().softmax(-1)
    q = ref.posterior_ref(x, zt, a_s, a_t)[0, 0]
    q0 = ref.posterior_ref(x, zt, 1.0, a_t)[0, 0]
    exact = kappa * q + (1 - kappa) * (a_s * q0 + (1 - a_s) / K)
    draws = _draws(sample_posterior, logits, zt, a_s, a_t, 60_000, seed=9, kappa=kappa, impl=impl)
    assert chi_square_pvalue(draws, exact) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K,top_p", [(7, 0.5), (64, 0.9), (1000, 0.8)])
def test_nucleus_sampler_matches_exact_filtered_posterior(impl, K, top_p):
    logits = torch.randn(1, 1, K) * 2
    zt = torch.tensor([[int(logits.argmin())]])                    # z_t outside the nucleus
    p = logits.double().softmax(-1)[0, 0]
    order = p.argsort(descending=True)
    keep = torch.zeros(K, dtype=torch.bool)
    keep[order[: int((p[order].cumsum(0) < top_p).sum()) + 1]] = True   # smallest set with mass >= p
    filtered = torch.where(keep, p, torch.zeros_like(p))
    filtered = filtered / filtered.sum()
    exact = ref.posterior_ref(filtered[None, None], zt, 0.7, 0.4)[0, 0]
    draws = _draws(sample_posterior, logits, zt, 0.7, 0.4, _n(K, impl), seed=K, top_p=top_p, impl=impl)
    assert chi_square_pvalue(draws, exact) > 1e-3


def _public_nucleus_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The public rule written out: sort in float64, drop an id when the mass sorted before it exceeds top_p."""
    sl, order = logits.double().sort(-1, descending=True)
    cum = sl.softmax(-1).cumsum(-1)
    drop = torch.zeros_like(cum, dtype=torch.bool)
    drop[..., 1:] = cum[..., :-1] > top_p
    return ~torch.zeros_like(drop).scatter(-1, order, drop)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_nucleus_cut_without_a_sort_is_the_public_nucleus(top_p):
    """The Triton cut (bisection over float32 order keys) keeps exactly the ids the public sort
    keeps, on distinct fp32 logits (non-power-of-two K, peaked and flat rows); with bf16 ties it
    keeps whole tied groups, as the PyTorch path's nucleus_filter does."""
    from duo_fast.kernels.sample_posterior import nucleus_cut_fwd
    from duo_fast.ops.posterior import nucleus_filter

    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(40, 777, generator=g) * 4, torch.randn(40, 777, generator=g) * 0.3])
    cut = nucleus_cut_fwd(logits.to(DEVICE), top_p).cpu()
    keep = logits >= cut[:, None]
    assert torch.equal(keep, _public_nucleus_keep(logits, top_p))
    assert torch.equal(keep, nucleus_filter(logits, top_p) > float("-inf"))
    ties = (logits * 2).round().bfloat16()                      # many exact ties
    keep16 = ties.float() >= nucleus_cut_fwd(ties.to(DEVICE), top_p).cpu()[:, None]
    assert (keep16 == (nucleus_filter(ties, top_p) > float("-inf"))).all(-1).float().mean() >= 0.97


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_nucleus_matches_exact_filtered_posterior(impl):
    from duo_fast.ops import sample_posterior_linear

    K, D, n = 90, 24, 40_000
    g = torch.Generator().manual_seed(3)
    h, w, b = torch.randn(1, 1, D, generator=g), torch.randn(K, D, generator=g) * 0.5, torch.randn(K, generator=g)
    logits = torch.nn.functional.linear(h, w, b).double()[0, 0]
    keep = _public_nucleus_keep(logits, 0.8)
    filtered = torch.where(keep, logits.softmax(-1), torch.zeros_like(logits))
    zt = torch.tensor([[int(logits.argmin())]])
    exact = ref.posterior_ref((filtered / filtered.sum())[None, None], zt, 0.7, 0.4)[0, 0]
    dev = DEVICE if impl == "triton" else torch.device("cpu")
    draws = sample_posterior_linear(h.expand(1, n, D).contiguous().to(dev), w.to(dev), b.to(dev),
                                    zt.expand(1, n).contiguous().to(dev), 0.7, 0.4, top_p=0.8, impl=impl,
                                    generator=torch.Generator().manual_seed(4))[0].cpu()
    assert chi_square_pvalue(draws, exact) > 1e-3


def test_the_step_kinds_are_the_kernels_constants():
    from duo_fast.kernels import sample_posterior as kernel
    from duo_fast.ops.posterior import STEP_KINDS, StepKind

    assert [int(k) for k in StepKind] == [kernel.POSTERIOR.value, kernel.ANCESTRAL.value, kernel.GREEDY.value]
    assert set(STEP_KINDS) == {None, "ancestral", "greedy"}
