"""Conditional generation: a prompt comes back unchanged and infilling keeps every known token,
with every sampler, fused or not, on both implementations; the gap tokens' first draw follows
the exact posterior of the denoiser that saw the clamped context (chi-square)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import chi_square_pvalue

from duo_fast import reference as ref
from duo_fast.model import DiT, DiTConfig
from duo_fast.sampling import SamplerConfig, generate
from duo_fast.sampling.loop import SamplingLoop
from duo_fast.sampling.psi import PSI_PRESETS

K, L = 40, 12
TRITON = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch", "triton"] if TRITON else ["torch"]


def _model() -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(vocab_size=K, model_length=L, hidden_dim=32, n_blocks=1, n_heads=2, cond_dim=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)              # large enough that the context changes the predictions
    return model


SAMPLERS = {
    "greedy": dict(noise_removal="greedy"),
    "ancestral": dict(noise_removal="ancestral"),
    "none": dict(noise_removal="none"),
    "nucleus": dict(noise_removal="ancestral", top_p=0.8),
    "psi-ramp": dict(kappa=(0.3, 0.9)),
    "psi-preset": dict(psi=PSI_PRESETS["duo-max-capped-remdm"]["psi"], top_p=0.9),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_prompt_and_infill_keep_their_tokens(monkeypatch, impl, fused, sampler):
    monkeypatch.setenv("DUO_FAST_IMPL", impl)
    model = _model()
    prompt = torch.tensor([3, 1, 4, 1, 5])
    cfg = SamplerConfig(steps=3, batch=6, length=L, fused=fused, seed=2, **SAMPLERS[sampler])
    ids, _ = generate(model, cfg, progress=False, prefix=prompt)
    assert (ids[:, :5] == prompt).all()
    free, _ = generate(model, cfg, progress=False)
    assert not (free[:, :5] == prompt).all(), "unconditional samples would keep the prompt only by chance"
    template = torch.tensor([7, 0, 0, 9, 9, 0, 0, 0, 2, 0, 0, 8])
    known = template != 0
    ids, _ = generate(model, cfg, progress=False, prefix=template, known_mask=known)
    assert (ids[:, known] == template[known]).all()
    assert (ids[:, ~known] != 0).any(), "the gaps must be sampled, not left at the template's placeholder"


@pytest.mark.parametrize("impl", IMPLS)
def test_gap_tokens_follow_the_exact_posterior_given_the_clamped_context(monkeypatch, impl):
    monkeypatch.setenv("DUO_FAST_IMPL", impl)
    model = _model()
    n = 6000 if impl == "torch" else 3000
    cfg = SamplerConfig(steps=1, batch=n, length=L, noise_removal="none", t_min=0.05)
    loop = SamplingLoop(model, cfg, torch.device("cpu"), None, torch.Generator().manual_seed(5))
    z1 = torch.randint(0, K, (L,), generator=torch.Generator().manual_seed(3))
    template = torch.randint(0, K, (L,), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(L, dtype=torch.bool)
    mask[[0, 1, 2, 5, 6, 10]] = True
    clamped = torch.where(mask, template, z1)
    with torch.no_grad():
        x = model(clamped[None], loop.sigmas[0]).double().softmax(-1)[0]           # (L, K)
        x_free = model(z1[None], loop.sigmas[0]).double().softmax(-1)[0]
    a_t, a_s = float(loop.alphas[0]), float(loop.alphas[1])
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(6))
    out = loop(z1.expand(n, L).contiguous(), seeds, known=template.expand(n, L), mask=mask.expand(n, L))
    assert (out[:, mask] == template[mask]).all()
    exact = ref.posterior_ref(x[None], z1[None], a_s, a_t)[0]                      # (L, K)
    unclamped = ref.posterior_ref(x_free[None], z1[None], a_s, a_t)[0]
    moved = (exact - unclamped).abs().sum(-1).masked_fill(mask, 0)
    assert moved.max() > 0.1, "the context must change a gap's posterior for the test to mean anything"
    for pos in moved.topk(2).indices.tolist():                                    # the gaps the context moves most
        assert chi_square_pvalue(out[:, pos], exact[pos]) > 1e-3, pos


@pytest.mark.parametrize("bad,match", [
    (dict(prefix=torch.arange(L + 1)), "more than the sampled length"),
    (dict(prefix=torch.tensor([1, K])), "must be in"),
    (dict(prefix=torch.tensor([1.0, 2.0])), "integer token ids"),
    (dict(prefix=torch.tensor([1, 2]), known_mask=torch.tensor([1, 0])), "must be bool"),
    (dict(known_mask=torch.tensor([True])), "needs prefix"),
    (dict(prefix=torch.ones(3, 2, dtype=torch.long)), "rows for a batch"),
])
def test_bad_conditioning_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        generate(_model(), SamplerConfig(steps=1, batch=2, length=L), progress=False, **bad)
