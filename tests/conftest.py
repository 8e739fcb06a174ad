"""Shared test helpers: seeding, statistical bounds, and verbose closeness checks."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

# Without a GPU, the Triton kernels run in the interpreter on CPU tensors. Triton reads this when
# a kernel module is imported, so it is set here, before any test module imports duo_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True, scope="session")
def _shared_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One cache (tokenizers, T tables) for the whole session, never the user's own."""
    os.environ["DUO_FAST_CACHE"] = str(tmp_path_factory.mktemp("duo_fast_cache"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """allclose that reports the worst element, the mismatch count and NaN/inf."""
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values in the result"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        i = int(err.argmax())
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} mismatches; worst at flat index {i}: "
                             f"{a.flatten()[i].item()!r} vs {e.flatten()[i].item()!r} (abs err {err.max().item():.3e})")


def assert_binomial(successes: int, n: int, p: float, sigmas: float = 4.0, what: str = "") -> None:
    """``successes`` of ``n`` Bernoulli(p) trials lies within ``sigmas`` standard deviations."""
    sd = math.sqrt(n * p * (1 - p))
    dev = abs(successes - n * p)
    assert dev <= sigmas * sd + 1e-9, (f"{what}: {successes}/{n} = {successes / n:.5f}, expected p = {p:.5f} "
                                       f"(dev {dev / max(sd, 1e-12):.2f} sd)")


def assert_two_binomials(k1: int, n1: int, k2: int, n2: int, sigmas: float = 4.0, what: str = "") -> None:
    """Two binomial frequencies agree within ``sigmas`` standard errors of their difference."""
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / n1 + 1 / n2))
    assert abs(k1 / n1 - k2 / n2) <= sigmas * se, f"{what}: {k1 / n1:.5f} vs {k2 / n2:.5f} (se {se:.2e})"


def chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of integer ``samples`` against ``probs`` (K,); categories
    with an expected count below ``min_expected`` are pooled into one."""
    n = samples.numel()
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double().numpy()
    exp = probs.double().numpy() * n
    assert counts[exp == 0].sum() == 0, "a sample fell where the probability is zero"
    big = exp >= min_expected
    obs_c = list(counts[big])
    exp_c = list(exp[big])
    if (~big).any() and exp[~big].sum() > 0:
        obs_c.append(counts[~big].sum())
        exp_c.append(exp[~big].sum())
    obs_a, exp_a = np.array(obs_c), np.array(exp_c)
    exp_a *= obs_a.sum() / exp_a.sum()
    if len(obs_a) < 2:
        return 1.0
    return float(stats.chisquare(obs_a, exp_a).pvalue)


def impl_device(impl: str) -> torch.device:
    """Where a test of ``impl`` puts its tensors: the Triton kernels run on CUDA when there is a
    GPU (bench/gpu_check.sh), in the interpreter on CPU tensors otherwise; PyTorch paths on CPU."""
    return DEVICE if impl == "triton" else torch.device("cpu")
