"""Gaussian latents and the duality (sections 4-6): argmax frequencies, top-k, coupled sampler."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_binomial, assert_close, assert_two_binomials

from duo_fast import TTable
from duo_fast import reference as ref
from duo_fast.ops import relaxed_torch


def p_of(table: TTable, gamma: float) -> float:
    """P(argmax w = x) = alpha + (1 - alpha)/K from the table."""
    a = float(table.alpha(torch.tensor([gamma], dtype=torch.float64))[0])
    return a + (1 - a) / table.vocab_size


@pytest.mark.parametrize("K", [100, 1000])
@pytest.mark.parametrize("gamma", [-3.5, -2.0])
def test_argmax_frequency_matches_T(K, gamma):
    table = TTable.build(K)
    n = 20_000
    x0 = torch.randint(0, K, (4, n // 4))
    w = ref.gaussian_latents_ref(x0, torch.full((4,), gamma), K, generator=torch.Generator().manual_seed(K))
    hits = int((w.argmax(-1) == x0).sum())
    assert_binomial(hits, n, p_of(table, gamma), what=f"P(argmax w = x), K={K}, gamma={gamma}")


def test_dense_relaxation_matches_definition():
    K, D = 37, 5
    x0 = torch.randint(0, K, (2, 3))
    gamma = torch.tensor([-3.0, -2.0], dtype=torch.float64)
    E = torch.randn(K, D, dtype=torch.float64)
    eps = torch.randn(2, 3, K, dtype=torch.float64)
    h0, zt = ref.relaxed_embedding_ref(x0, gamma, 0.1, E, eps=eps)
    at, st = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    for b in range(2):
        for i in range(3):
            w = st[b] * eps[b, i]
            w[x0[b, i]] += at[b]
            assert_close(h0[b, i], torch.softmax(w / 0.1, 0) @ E, atol=1e-12, rtol=1e-12, what="h0")
            assert zt[b, i] == w.argmax()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_argmax_rule_is_exact(k):
    K, gamma = 100, -2.0
    table = TTable.build(K)
    n = 40_000
    x0 = torch.randint(0, K, (1, n))
    idx, weights, zt = relaxed_torch.topk_relaxation(x0, torch.tensor([gamma]), 1e-3, K, k,
                                               generator=torch.Generator().manual_seed(k))
    assert idx.shape == (1, n, k + 1) and weights.shape == (1, n, k + 1)
    assert (idx[..., 1:] != x0[..., None]).all(), "top-k ids must exclude x"
    assert all(len(set(row)) == k + 1 for row in idx[0, :200].tolist()), "ids must be distinct"
    assert (weights.sum(-1) <= 1 + 1e-12).all()
    # exact P(z_t = x) = 0.581 at K = 100, gamma = -2 (the public rule gives 0.711 at k = 2)
    assert_binomial(int((zt == x0).sum()), n, p_of(table, gamma), what=f"top-{k} P(z_t = x)")


def test_topk_with_every_coordinate_is_the_exact_softmax():
    K = 6
    x0 = torch.randint(0, K, (1, 500))
    _, weights, _ = relaxed_torch.topk_relaxation(x0, torch.tensor([-2.5]), 0.5, K, K - 1)
    assert_close(weights.sum(-1), torch.ones(1, 500, dtype=torch.float64), atol=1e-12, rtol=0, what="weights sum")


def test_topk_order_statistics_distribution():
    # G_1 of n iid N(0,1): P(G_1 <= c) = Phi(c)^n
    n, c = 50, 2.0
    G = relaxed_torch.topk_order_statistics(n, 3, (50_000,), generator=torch.Generator().manual_seed(0))
    assert (G[:, 0] >= G[:, 1]).all() and (G[:, 1] >= G[:, 2]).all()
    p = float(torch.special.ndtr(torch.tensor(c, dtype=torch.float64)) ** n)
    assert_binomial(int((G[:, 0] <= c).sum()), 50_000, p, what="P(G_1 <= c)")


@pytest.mark.parametrize("K", [10, 100, 1000])
def test_coupled_sampler_matches_brute_force(K):
    n = 30_000
    x0 = torch.randint(0, K, (1, n))
    gt, gs = torch.tensor([-2.0]), torch.tensor([-3.0])
    zt1, zs1 = relaxed_torch.coupled_argmax(x0, gt, gs, K, generator=torch.Generator().manual_seed(1))
    m = 6_000 if K == 1000 else n                       # dense eps is n x K
    zt2, zs2 = ref.coupled_argmax_dense_ref(x0[:, :m], gt, gs, K, generator=torch.Generator().manual_seed(2))
    for name, a, b in [("P(z_t = x)", zt1 == x0, zt2 == x0[:, :m]), ("P(z_s = x)", zs1 == x0, zs2 == x0[:, :m]),
                       ("P(z_t = z_s)", zt1 == zs1, zt2 == zs2)]:
        assert_two_binomials(int(a.sum()), n, int(b.sum()), m, what=f"{name}, K={K}")
    # and against T: z_s = x whenever z_t = x (less noise at s), so P(z_t = z_s) = p_t + 1 - p_s
    table = TTable.build(K)
    p_t, p_s = p_of(table, -2.0), p_of(table, -3.0)
    assert_binomial(int((zt1 == x0).sum()), n, p_t, what="O(1) P(z_t = x) vs T")
    assert_binomial(int((zt1 == zs1).sum()), n, p_t + 1 - p_s, what="O(1) P(z_t = z_s) vs T")
    # when they differ from x, both take the same uniform non-x id
    both = (zt1 != x0) & (zs1 != x0)
    assert (zt1[both] == zs1[both]).all() and (zt1 != x0).sum() > 0


def test_qt_marginal_and_times():
    K, n = 50, 40_000
    x0 = torch.randint(0, K, (1, n))
    z = ref.sample_qt(x0, 0.3, K, generator=torch.Generator().manual_seed(0))
    assert_binomial(int((z == x0).sum()), n, 0.3 + 0.7 / K, what="q_t keeps x")
    t = ref.stratified_times(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert ((t >= 1e-3) & (t <= 1)).all()
    # the public rule: stratum k holds (u_k + k)/n with its own u_k (not one shared offset)
    assert torch.equal(((t - 1e-3) / (1 - 1e-3) * 8).floor(), torch.arange(8, dtype=torch.float64))
    assert ((t - 1e-3) / (1 - 1e-3) * 8 % 1).unique().numel() == 8
    # a micro-batch's slice of the global batch's strata: strata 16..23 of 64
    part = ref.stratified_times(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64, strata=64, first=16)
    assert torch.equal(((part - 1e-3) / (1 - 1e-3) * 64).floor(), torch.arange(16, 24, dtype=torch.float64))
