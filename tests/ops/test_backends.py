"""The backend registry (``duo_fast.ops.backends``): what ``backend()`` and ``duo-fast env``
report is what the operators run, forced implementations are honoured or refused, and an
unknown value of the variables is one line naming the variable."""

from __future__ import annotations

import pytest
import torch

from duo_fast.cli import CliError, main
from duo_fast.ops import backend, backends, coupled_latents, rb_loss, rb_loss_linear, relaxed_embedding, sample_posterior
from duo_fast.ops.ttable import TTable


def _run_every_op() -> None:
    g = torch.Generator().manual_seed(0)
    B, L, K, D = 2, 5, 37, 8
    logits = torch.randn(B, L, K, generator=g)
    zt, x0 = torch.randint(0, K, (B, L), generator=g), torch.randint(0, K, (B, L), generator=g)
    rb_loss(logits, zt, x0, 0.5, -1.0)
    rb_loss_linear(torch.randn(B, L, D, generator=g), torch.randn(K, D, generator=g), None, zt, x0, 0.5, -1.0)
    relaxed_embedding(x0, -2.0, 0.3, torch.randn(K, D, generator=g), seed=1, mode="dense")
    sample_posterior(logits, zt, 0.7, 0.4, seed=2)
    coupled_latents(x0, -2.0, -3.0, K, seed=3)
    TTable.build(K, -5.0, -1.0).alpha_and_derivative(torch.tensor([-3.0], dtype=torch.float64))


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_the_reported_backend_is_the_one_that_ran(monkeypatch, impl):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DUO_FAST_IMPL", impl)
    backends.LAST_RUN.clear()
    _run_every_op()
    reported = backend("cpu")
    for op, ran in backends.LAST_RUN.items():
        assert reported[op] == ran, f"{op}: reported {reported[op]}, ran {ran}"
    assert {"rb_loss", "rb_loss_linear", "relaxed_embedding", "sample_posterior", "coupled_latents",
            "ttable_lookup"} <= set(backends.LAST_RUN)


def test_the_interpreter_is_reported_as_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DUO_FAST_IMPL", raising=False)
    backends.LAST_RUN.clear()
    g = torch.Generator().manual_seed(0)
    logits, zt = torch.randn(1, 3, 17, generator=g), torch.randint(0, 17, (1, 3), generator=g)
    sample_posterior(logits, zt, 0.7, 0.4, seed=2)
    assert backends.LAST_RUN["sample_posterior"] == backend("cpu")["sample_posterior"] == "triton"


def test_a_forced_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        backends.choose("sample_posterior", torch.device("cpu"), "triton")


@pytest.mark.parametrize("var", ["DUO_FAST_IMPL", "DUO_FAST_TTABLE_IMPL"])
def test_an_unknown_value_is_one_line_naming_the_variable(monkeypatch, capsys, var):
    monkeypatch.setenv(var, "fastest")
    with pytest.raises(ValueError, match=var):
        backends.check_environment()
    with pytest.raises(CliError):
        main(["env", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and var in err[0] and "fastest" in err[0]
