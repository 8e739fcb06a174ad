"""pytest-benchmark suite of the fused operators at CPU-sized shapes (GPU when present):

    pytest bench --benchmark-only

Kept out of ``make test`` (which runs ``tests/``). Each benchmark also asserts its result, so a
fast wrong kernel fails. The comparisons against the reference-style paths, with ratios and
memory, are ``duo-fast bench``.
"""

from __future__ import annotations

import pytest
import torch

from duo_fast import TTable
from duo_fast.ops import rb_loss, rb_loss_linear, relaxed_embedding, sample_posterior, sample_posterior_linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, K, D = 512, 4096, 256


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (1, N), generator=g).to(DEVICE)
    zt = torch.where(torch.rand(1, N, generator=g).to(DEVICE) < 0.5, x0, torch.randint(0, K, (1, N), generator=g).to(DEVICE))
    return {"x0": x0, "zt": zt, "logits": torch.randn(1, N, K, generator=g).to(DEVICE),
            "h": torch.randn(1, N, D, generator=g).to(DEVICE), "w": (torch.randn(K, D, generator=g) * 0.06).to(DEVICE),
            "a": torch.full((1,), 0.3, dtype=torch.float64, device=DEVICE)}


def test_ttable_lookup(benchmark):
    table = TTable.build(K)
    gamma = torch.empty(100_000, dtype=torch.float64, device=DEVICE).uniform_(-5, -1)
    alpha, _ = benchmark(table.alpha_and_derivative, gamma)
    assert ((alpha >= 0) & (alpha <= 1)).all()


def test_rb_loss_forward_backward(benchmark, data):
    leaf = data["logits"].clone().requires_grad_()

    def run():
        leaf.grad = None
        rb_loss(leaf, data["zt"], data["x0"], data["a"], -1.0).mean().backward()
        return leaf.grad
    grad = benchmark(run)
    assert torch.isfinite(grad).all() and grad.sum(-1).abs().max() < 1e-4     # softmax gradients sum to 0


def test_rb_loss_linear_forward_backward(benchmark, data):
    h = data["h"].clone().requires_grad_()

    def run():
        h.grad = None
        loss = rb_loss_linear(h, data["w"], None, data["zt"], data["x0"], data["a"], -1.0).mean()
        loss.backward()
        return loss
    assert torch.isfinite(benchmark(run))


@pytest.mark.parametrize("mode", ["dense", "sparse", "topk"])
def test_relaxed_embedding_forward_backward(benchmark, data, mode):
    E = (data["w"] * 0.3).clone().requires_grad_()

    def run():
        E.grad = None
        h0, zt = relaxed_embedding(data["x0"], -2.5, 1e-3, E, seed=0, mode=mode)
        h0.sum().backward()
        return zt
    zt = benchmark(run)
    assert zt.shape == data["x0"].shape


def test_sample_posterior_step(benchmark, data):
    z = benchmark(sample_posterior, data["logits"], data["zt"], 0.6, 0.5, seed=1)
    assert ((z >= 0) & (z < K)).all()


def test_sample_posterior_linear_step(benchmark, data):
    z = benchmark(sample_posterior_linear, data["h"], data["w"], None, data["zt"], 0.6, 0.5, seed=1)
    assert ((z >= 0) & (z < K)).all()
