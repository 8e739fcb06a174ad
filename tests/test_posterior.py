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
@pytest.mark.parametrize("kappa", [0.0, 0.4])
def test_psi_sampler_matches_exact_mixture(impl, kappa):
    K, a_s, a_t = 64, 0.7, 0.4
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
