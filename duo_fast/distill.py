"""Discrete Consistency Distillation (duo-math.md section 6), single process.

The student starts from a trained Duo model; the teacher is a frozen copy refreshed every
``update_every`` optimizer steps (from the student, or from its EMA). In round
``n = step // update_every`` the step gap is ``dt = 2^n / t_grid`` (or ``(n + 1) / t_grid`` with
linear growth), capped at 1. Each step: stratified ``t``, ``t <- clip(t + dt, 0, 1)``,
``s = t - dt``; ``gamma`` linear in time on ``[gamma_min, gamma_max]``; ``alpha = T(gamma)``;
``(z_t, z_s)`` from one shared Gaussian noise by ``ops.coupled_latents`` (O(1) per token, exact);
the student's log-probabilities at ``(z_t, -log alpha_t)`` (with gradient) against the teacher's
at ``(z_s, -log alpha_s)`` (no gradient, float32); loss ``KL(student || teacher)`` (``kl-bwd``) or
``KL(teacher || student)`` (``kl-fwd``) summed over the vocabulary, mean over tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import reference as ref
from .checkpoint import save_hf_folder
from .data import get_tokenizer
from .data.blocks import BlockOrder, cached_blocks
from .evaluate import check_tokenizer_vocab
from .ops import coupled_latents
from .options import option
from .ttable import TTable

__all__ = ["DistillConfig", "distill", "dcd_gap", "DISTILL_PRESETS"]


@dataclass
class DistillConfig:
    """Every option of ``duo-fast distill``; defaults are the public DCD recipe's (section 6)."""

    checkpoint: str = option("", "the model to distil: a duo-fast train export, a HF folder, a hub id or a .ckpt")
    dataset: str = option("openwebtext", "bundled, openwebtext, wikitext103, wikitext2, lm1b, or text:PATH")
    tokenizer: str = option("", "tokenizer (default: the checkpoint's, from its config.json)")
    tokenizer_vocab: int = option(4096, "vocabulary size of the bundled BPE tokenizer")
    length: int = option(0, "sequence length (0: the model's)")
    batch_size: int = option(128, "sequences per optimizer step")
    steps: int = option(50_000, "optimizer steps")
    lr: float = option(6e-5, "AdamW learning rate after warm-up")
    warmup_steps: int = option(500, "linear warm-up steps")
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)")
    ema: float = option(0.999, "EMA decay of the exported weights (0 disables)")
    update_every: int = option(10_000, "optimizer steps per round: the teacher is refreshed at each round boundary")
    teacher_from: str = option("student", "what the teacher is refreshed from: student or ema")
    t_grid: int = option(512, "dt = 2^round / t_grid")
    dt_growth: str = option("double", "double (dt doubles per round) or linear (dt = (round + 1) / t_grid)")
    gamma_min: float = option(-4.0, "gamma at t = 0")
    gamma_max: float = option(-1.0, "gamma at t = 1")
    loss: str = option("kl-bwd", "kl-bwd: KL(student || teacher); kl-fwd: KL(teacher || student)")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    log_every: int = option(1, "steps between lines of the JSONL log")
    out: str = option("runs/distill", "output folder: log.jsonl, export/, summary.json")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("distill needs --checkpoint (the model to distil)")
        if self.teacher_from not in ("student", "ema") or self.dt_growth not in ("double", "linear"):
            raise ValueError("teacher_from must be student or ema; dt_growth double or linear")
        if self.loss not in ("kl-bwd", "kl-fwd"):
            raise ValueError(f"loss must be kl-bwd or kl-fwd, got {self.loss!r}")
        if self.teacher_from == "ema" and self.ema <= 0:
            raise ValueError("teacher_from=ema needs ema > 0")
        if self.batch_size < 1 or self.steps < 1 or self.update_every < 1 or self.t_grid < 1:
            raise ValueError("batch_size, steps, update_every and t_grid must be >= 1")
        if not self.gamma_min < self.gamma_max:
            raise ValueError("gamma_min must be below gamma_max")


DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    "owt": dict(dataset="openwebtext", batch_size=128, steps=50_000, update_every=10_000),
    "demo": dict(dataset="bundled", batch_size=16, steps=60, update_every=20, t_grid=8, warmup_steps=5, lr=1e-4,
                 ema=0.0, out="runs/demo-distill"),
}


def dcd_gap(step: int, cfg: DistillConfig) -> tuple[int, float]:
    """(round, dt) at ``step``."""
    n = step // cfg.update_every
    dt = (2.0 ** n if cfg.dt_growth == "double" else n + 1.0) / cfg.t_grid
    return n, min(1.0, dt)


def _kl(student_logits: Tensor, teacher_logits: Tensor, direction: str) -> Tensor:
    """Per-token KL over the vocabulary, float32."""
    ls = student_logits.float().log_softmax(-1)
    lt = teacher_logits.float().log_softmax(-1)
    if direction == "kl-bwd":
        return (ls.exp() * (ls - lt)).sum(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run DCD; writes ``out/log.jsonl``, ``out/export`` (HF layout) and ``out/summary.json``."""
    from tqdm.auto import tqdm

    from .pretrained import load_pretrained
    from .train import resolve_device

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    student, info = load_pretrained(cfg.checkpoint, device=device)
    K = student.config.vocab_size
    L = cfg.length or student.config.model_length
    tok_name = cfg.tokenizer or info.extra.get("tokenizer") or {50257: "gpt2", 50258: "gpt2"}.get(K, "")
    if not tok_name:
        raise ValueError("the checkpoint names no tokenizer: pass --tokenizer")
    tokenizer = get_tokenizer(tok_name, info.extra.get("tokenizer_vocab", cfg.tokenizer_vocab))
    check_tokenizer_vocab(tokenizer, K)
    tok_vocab = info.extra.get("tokenizer_vocab", cfg.tokenizer_vocab)
    tok_key = f"{tok_name}-{tok_vocab}" if tok_name == "bundled" else tok_name
    blocks = cached_blocks(cfg.dataset, "train", tokenizer, tok_key, L)
    if blocks.shape[0] < cfg.batch_size:
        raise ValueError(f"only {blocks.shape[0]} blocks of length {L} for a batch of {cfg.batch_size}")
    order = BlockOrder(blocks.shape[0], cfg.batch_size, seed=cfg.seed + 3)
    student.train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    ema_model = copy.deepcopy(student).eval().requires_grad_(False) if cfg.ema > 0 else None
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    table = TTable.build(K, min(-5.0, cfg.gamma_min), max(-1.0, cfg.gamma_max))
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    seed_gen = torch.Generator().manual_seed(cfg.seed + 2)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "w")
    print(f"duo-fast distill: {info.preset or 'custom'} model from {cfg.checkpoint}, K={K}, L={L}, "
          f"batch={cfg.batch_size}, {cfg.steps} steps, rounds of {cfg.update_every}, {cfg.loss}, device={device}")
    losses: list[float] = []
    t_start = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc="distill", dynamic_ncols=True)
    for step in bar:
        rnd, dt = dcd_gap(step, cfg)
        refreshed = step > 0 and step % cfg.update_every == 0
        if refreshed:
            src = ema_model if cfg.teacher_from == "ema" else student
            teacher.load_state_dict(src.state_dict())
        x0 = blocks[order.next_indices()].to(device)
        t = ref.stratified_times(cfg.batch_size, generator=gen, device=device, dtype=torch.float64)
        t = (t + dt).clamp(0.0, 1.0)
        s = t - dt
        span = cfg.gamma_max - cfg.gamma_min
        gamma_t, gamma_s = cfg.gamma_min + t * span, cfg.gamma_min + s * span
        alpha_t, alpha_s = table.alpha_and_derivative(gamma_t)[0], table.alpha_and_derivative(gamma_s)[0]
        zt, zs = coupled_latents(x0, gamma_t, gamma_s, K, seed=int(torch.randint(0, 2**62, (1,), generator=seed_gen)))
        with torch.no_grad():
            teacher_logits = teacher(zs, (-torch.log(alpha_s)).float())
        loss = _kl(student(zt, (-torch.log(alpha_t)).float()), teacher_logits, cfg.loss).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        sched.step()
        if ema_model is not None:
            with torch.no_grad():
                for pe, p in zip(ema_model.parameters(), student.parameters()):
                    pe.lerp_(p, 1 - cfg.ema)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"distillation loss is {value} at step {step}")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}", dt=f"{dt:.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps - 1 or refreshed:
            log.write(json.dumps({"step": step, "loss": value, "round": rnd, "dt": dt, "teacher_refreshed": refreshed,
                                  "lr": sched.get_last_lr()[0], "grad_norm": float(gn)}) + "\n")
            log.flush()
    log.close()
    seconds = time.perf_counter() - t_start
    final = ema_model if ema_model is not None else student
    export = save_hf_folder(final, out / "export", extra={
        "tokenizer": tok_name, "tokenizer_vocab": tok_vocab,
        "distilled_from": cfg.checkpoint, "steps": cfg.steps, "weights": "ema" if ema_model is not None else "raw"})
    n = max(1, min(10, len(losses) // 4))
    summary = {"loss_first": sum(losses[:n]) / n, "loss_last": sum(losses[-n:]) / n, "rounds": dcd_gap(cfg.steps - 1, cfg)[0] + 1,
               "tokens_per_s": cfg.steps * cfg.batch_size * L / seconds, "export": str(export),
               "config": dataclasses.asdict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"distillation loss ({cfg.loss}): start {summary['loss_first']:.4f} -> end {summary['loss_last']:.4f} "
          f"over {summary['rounds']} rounds; {summary['tokens_per_s']:,.0f} tokens/s")
    print(f"exported {'EMA' if ema_model is not None else 'raw'} weights to {export}")
    return summary
