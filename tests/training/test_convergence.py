"""A tiny DiT learns a task that needs context: every sequence repeats one token, so at low
noise the majority of z_t reveals x. The NELBO must fall far below its starting value."""

from __future__ import annotations

import pytest
import torch

from duo_fast import reference as ref
from duo_fast.model import DiT, DiTConfig
from duo_fast.ops import rb_loss

pytestmark = pytest.mark.slow


def test_tiny_dit_learns_from_context():
    torch.manual_seed(0)
    K, L, B = 64, 32, 32
    model = DiT(DiTConfig.from_name("tiny", vocab_size=K, model_length=L, n_blocks=2, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def nelbo(x0, g):
        t = ref.stratified_times(B, generator=g, dtype=torch.float64)
        a, da = ref.alpha_loglinear(t)
        zt = ref.sample_qt(x0, a, K, generator=g)
        return rb_loss(model(zt, (-a.log()).float()), zt, x0, a, da).mean()

    def evaluate():
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return sum(float(nelbo(torch.randint(0, K, (B, 1), generator=g).expand(B, L), g)) for _ in range(4)) / 4

    start = evaluate()
    for _ in range(120):
        loss = nelbo(torch.randint(0, K, (B, 1), generator=gen).expand(B, L), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = evaluate()
    assert start > 4.0 and end < 0.25 * start, (start, end)
