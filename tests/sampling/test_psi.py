"""Psi samplers: every mode, phase split and time profile of the public sampling.psi block,
checked against the public definitions written out here step by step (one Psi step's draws
against the exact Psi posterior, s = t included, are in test_posterior.py)."""

from __future__ import annotations

import math

import pytest
import torch

from duo_fast import reference as ref
from duo_fast.model import DiT, DiTConfig
from duo_fast.sampling import SamplerConfig, generate
from duo_fast.sampling.loop import SamplingLoop
from duo_fast.sampling.psi import PSI_PRESETS, PsiConfig, step_kappas, time_grid

EPS = 1e-3            # the public LogLinear / Cosine eps


def _alpha(t: float, schedule: str) -> float:
    t = (1 - EPS) * t
    return 1 - t if schedule == "loglinear" else 1 - math.cos(math.pi / 2 * (1 - t))


def _public_times(profile: str, steps: int, t_min: float, hi: float, mid: float, schedule: str) -> list[float]:
    """The public _get_sampling_time_profile, one value at a time."""
    n = steps + 1

    def lin(a: float, b: float, k: int) -> list[float]:
        return [a + (b - a) * i / (k - 1) for i in range(k)] if k > 1 else [a] * k

    if profile == "linear":
        return lin(1.0, t_min, n)
    c = float(profile.split("-")[3])
    if profile.endswith("inv"):
        c = 1 - c if schedule == "loglinear" else 1 - 2 / math.pi * math.acos(1 - c)
    n_hi, n_mid = round(hi * n), round(mid * n)
    return lin(1.0, c, n_hi) + [c] * n_mid + lin(c, t_min, n - n_hi - n_mid)


def _public_mode(mode: str, times: list[float], schedule: str) -> list[float]:
    """The public _mode_to_psi_kappas, one step at a time."""
    if mode == "pure-posterior":
        return [1.0] * len(times)
    if mode == "pure-pc":
        return [0.0] * len(times)
    eta = float(mode.split("-")[-1])
    if mode.startswith("constant-") and not mode.startswith("constant-remdm"):
        return [eta] * len(times)
    out = []
    for t, s in zip(times[:-1], times[1:]):
        a_t, a_s = _alpha(t, schedule), _alpha(s, schedule)
        if mode.startswith("max-capped-"):
            sig = eta if a_t == 0 else min(eta, (1 - a_s) / a_t)
        elif mode.startswith("max-rescale-"):
            sig = (min(eta, (1 - a_s) / a_t) if a_t > 0 else 1.0) * eta
        else:
            sig = eta
        out.append(min(1.0, max(0.0, 1 - sig / (1 - a_s))))
    return out + [1.0] if times else []


def _public_kappas(psi: PsiConfig, times: list[float], schedule: str) -> list[float]:
    n = len(times)
    n_hi, n_mid = round(psi.high_frac * n), round(psi.middle_frac * n)
    return (_public_mode(psi.high_mode, times[:n_hi], schedule)
            + _public_mode(psi.middle_mode, times[n_hi:n_hi + n_mid], schedule)
            + _public_mode(psi.low_mode, times[n_hi + n_mid:], schedule))


MODES = ["pure-posterior", "pure-pc", "constant-0.3", "constant-remdm-0.01", "max-capped-0.02", "max-rescale-0.05",
         "max-capped-0.5", "max-rescale-0.9"]
PROFILES = ["linear", "linear-constant-linear-0.3", "linear-constant-linear-0.9-inv"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_kappas_equal_the_public_definitions(mode, profile, schedule):
    for steps, hi, mid in [(256, 0.45, 0.5), (16, 0.2, 0.6), (7, 0.0, 0.0), (5, 0.5, 0.5), (3, 1.0, 0.0)]:
        psi = PsiConfig(profile, mode, "pure-posterior" if mode != "pure-posterior" else "pure-pc", mode, hi, mid)
        times = time_grid(psi, steps, 1e-5, schedule)
        want_t = _public_times(profile, steps, 1e-5, hi, mid, schedule)
        assert times.tolist() == pytest.approx(want_t, abs=1e-12), (steps, hi, mid)
        got = step_kappas(psi, times, schedule)
        want = _public_kappas(psi, want_t, schedule)
        assert len(got) == steps + 1 and got.tolist() == pytest.approx(want, abs=1e-9), (steps, hi, mid)


def test_phase_sizes_round_half_to_even_as_the_public_code():
    psi = PSI_PRESETS["duo-loop-remdm"]["psi"]
    times = time_grid(psi, 256, 1e-5, "loglinear")
    c = 1 - 0.9                                                   # the -inv profile: t with alpha = 0.9
    # 257 times: round(0.45 * 257) = 116 falling to c, round(0.5 * 257) = round(128.5) = 128 at c, 13 after
    assert len(times) == 257
    assert (times[:116].diff() < 0).all() and times[115] == pytest.approx(c)
    assert (times[116:244] == times[115]).all() and times[244] == pytest.approx(c) and (times[245:].diff() < 0).all()
    kappas = step_kappas(psi, times, "loglinear")
    a_s = ref.alpha_loglinear(torch.tensor(c, dtype=torch.float64))[0]
    assert kappas[116:243].tolist() == pytest.approx([1 - 0.01 / (1 - float(a_s))] * 127)
    assert kappas[243] == 1 and (kappas[:116] == 1).all() and (kappas[244:] == 1).all()


def test_presets_are_the_public_recipes():
    assert set(PSI_PRESETS) == {"duo-loop-remdm", "duo-max-capped-remdm", "duo-max-rescale-eta"}
    for p in PSI_PRESETS.values():
        assert p["steps"] == 256 and p["noise_removal"] == "ancestral" and p["schedule"] == "loglinear"
    assert PSI_PRESETS["duo-loop-remdm"]["top_p"] == 0.95
    assert PSI_PRESETS["duo-max-capped-remdm"]["psi"].middle_mode == "max-capped-0.01"
    assert PSI_PRESETS["duo-max-rescale-eta"]["psi"].low_mode == "max-rescale-0.05"


@pytest.mark.parametrize("bad", [dict(time_profile="cosine"), dict(time_profile="linear-constant-linear-x"),
                                 dict(time_profile="linear-constant-linear-1.5"), dict(high_mode="remdm"),
                                 dict(middle_mode="max-capped-abc"), dict(low_mode="constant-2"),
                                 dict(high_frac=-0.1), dict(high_frac=0.7, middle_frac=0.6)])
def test_bad_psi_settings_are_refused(bad):
    with pytest.raises(ValueError, match="psi"):
        PsiConfig(**bad)


def _model(K: int = 40) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(vocab_size=K, model_length=12, hidden_dim=32, n_blocks=1, n_heads=2, cond_dim=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_the_loop_uses_the_profile_and_the_kappas():
    psi = PSI_PRESETS["duo-loop-remdm"]["psi"]
    cfg = SamplerConfig(steps=20, batch=2, psi=psi, noise_removal="ancestral")
    loop = SamplingLoop(_model(), cfg, torch.device("cpu"), None, torch.Generator())
    times = time_grid(psi, 20, cfg.t_min, "loglinear")
    assert torch.equal(loop.alphas, ref.alpha_loglinear(times)[0])
    assert torch.equal(loop.kappas, step_kappas(psi, times, "loglinear")[:20])
    assert (loop.alphas[1:] == loop.alphas[:-1]).any(), "the constant phase must give s = t steps"
    ids, _ = generate(_model(), cfg, progress=False)
    assert ids.shape == (2, 12)


def test_kappa_ramp_and_psi_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        SamplerConfig(kappa=(0.5, 1.0), psi=PsiConfig())
