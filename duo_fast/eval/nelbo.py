"""Validation and zero-shot perplexity from the RB NELBO (docs/math.md sections 3, 8): one
function per use (``evaluate_nelbo`` for ``duo-fast eval``, ``validation_nelbo`` for training and
distillation validation), both over the same draws (``discrete_nelbo_draws``).

Per batch: stratified times, the log-linear schedule, ``z_t ~ q_t`` and the per-token RB loss;
the reported value is ``exp`` of the mean over all tokens. It is an upper bound on the true
perplexity (a NELBO, one Monte-Carlo draw of ``t`` per sequence).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from duo_fast.core.draws import sample_qt, stratified_times
from duo_fast.core.noise_schedule import alpha_loglinear
from duo_fast.model import DiT
from duo_fast.ops import rb_loss

__all__ = ["discrete_nelbo_draws", "evaluate_nelbo", "validation_nelbo"]


def discrete_nelbo_draws(x0: Tensor, vocab_size: int, generator: torch.Generator, strata: int | None = None,
                         first: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The random part of one NELBO evaluation batch: ``(z_t, alpha_t, dalpha_t)`` with
    stratified ``t`` (strata ``first ..`` of ``strata``, see ``reference.stratified_times``) and
    the log-linear schedule (float64 alphas, one per sequence)."""
    t = stratified_times(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64, strata=strata,
                             first=first)
    alpha, dalpha = alpha_loglinear(t)
    return sample_qt(x0, alpha, vocab_size, generator=generator), alpha, dalpha


@torch.no_grad()
def evaluate_nelbo(model: DiT, blocks: Tensor, batch_size: int = 16, seed: int = 0, device: str | torch.device = "cpu",
                   max_batches: int | None = None, progress: bool = True, pad_id: int | None = None) -> dict[str, float]:
    """Mean per-token NELBO (nats) and its perplexity over ``blocks`` (N, L) int64; with
    ``pad_id``, over the tokens that are not padding (the public attention-mask weighting)."""
    from tqdm.auto import tqdm

    model.eval()
    device = torch.device(device)
    K = model.config.vocab_size
    if blocks.numel() and int(blocks.max()) >= K:
        raise ValueError(f"token id {int(blocks.max())} is outside the model's vocabulary of {K}")
    gen = torch.Generator(device=device).manual_seed(seed)
    n_batches = math.ceil(blocks.shape[0] / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    total, count = 0.0, 0
    for b in tqdm(range(n_batches), disable=not progress, desc="eval", dynamic_ncols=True):
        x0 = blocks[b * batch_size:(b + 1) * batch_size].to(device)
        zt, alpha, dalpha = discrete_nelbo_draws(x0, K, gen)
        logits = model(zt, (-torch.log(alpha)).float())
        losses = rb_loss(logits, zt, x0, alpha, dalpha)
        if not torch.isfinite(losses).all():
            raise FloatingPointError("non-finite loss during evaluation (NaN/inf in the model's logits?)")
        keep = torch.ones_like(losses, dtype=torch.bool) if pad_id is None else x0 != pad_id
        total += float((losses.double() * keep).sum())
        count += int(keep.sum())
    nelbo = total / count
    return {"nelbo": nelbo, "ppl": math.exp(nelbo), "tokens": count, "batches": n_batches}


@torch.no_grad()
def validation_nelbo(model: DiT, blocks: Any, batch: int, n_batches: int, rank: int, world: int, seed: int,
                     device: torch.device, pad_id: int | None = None) -> float:
    """This rank's mean NELBO over its validation batches ``i * world + rank`` (``i < n_batches``)
    of ``batch`` blocks each, with a fixed noise stream per batch: every call gives comparable
    values (the caller averages over ranks)."""
    from duo_fast.core.seeds import micro_seed

    model.eval()
    K = model.config.vocab_size
    gen = torch.Generator(device=device)
    total, count = 0.0, 0
    n = max(1, min(n_batches, blocks.shape[0] // max(1, batch * world)))
    for i in range(n):
        j = i * world + rank
        x0 = blocks[j * batch:(j + 1) * batch].to(device)
        gen.manual_seed(micro_seed(seed, -1, j, 1))
        zt, alpha, dalpha = discrete_nelbo_draws(x0, K, gen)
        losses = rb_loss(model(zt, (-torch.log(alpha)).float()), zt, x0, alpha, dalpha).double()
        keep = torch.ones_like(losses, dtype=torch.bool) if pad_id is None else x0 != pad_id
        total += float((losses * keep).sum())
        count += int(keep.sum())
    return total / max(1, count)
