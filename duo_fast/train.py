"""Single-process Duo training in plain PyTorch: the Gaussian-latent curriculum, then USDM.

Per step (duo-math.md sections 3-5): stratified times ``t``; during the curriculum
``gamma_t = gamma_min + t (gamma_max - gamma_min)``, ``alpha_t = T(gamma_t)``,
``alpha'_t = (gamma_max - gamma_min) T'(gamma_t)``, Gaussian latents ``w = at e_x + st eps``,
``z_t = argmax w`` and the denoiser's input is the relaxed ``softmax(w / tau) @ E``
(``ops.relaxed_embedding``: the noise never exists as a B x L x K tensor); afterwards
``z_t ~ q_t`` under the log-linear schedule and the input is ``E[z_t]``. The loss is the
Rao-Blackwellized NELBO at ``(z_t, alpha_t, alpha'_t)`` in both phases (``ops.rb_loss_linear``
by default: fused with the output projection).
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
from .data import blocks_from_documents, get_tokenizer, load_text_documents
from .evaluate import discrete_nelbo_draws
from .model import DiT, DiTConfig
from .ops import rb_loss, rb_loss_linear, relaxed_embedding
from .options import option
from .ttable import TTable

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train", "Trainer", "tau_at", "resolve_device"]


@dataclass
class TrainConfig:
    """Every option of ``duo-fast train``; the defaults are the public recipe's where it has one."""

    model: str = option("small", "denoiser preset: tiny, small or medium (duo-math.md section 7)")
    dataset: str = option("bundled", "bundled, openwebtext, wikitext103, wikitext2, lm1b, or text:PATH (.txt/.jsonl)")
    tokenizer: str = option("bundled", "'bundled' (BPE trained on the bundled corpus), a local folder or a hub name")
    tokenizer_vocab: int = option(4096, "vocabulary size of the bundled BPE tokenizer")
    length: int = option(1024, "sequence length L of the training blocks")
    batch_size: int = option(512, "sequences per optimizer step")
    steps: int = option(1_000_000, "optimizer steps")
    lr: float = option(3e-4, "AdamW learning rate after warm-up")
    warmup_steps: int = option(2500, "linear warm-up steps, then constant learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)")
    dropout: float = option(0.1, "dropout of the denoiser's residual branches")
    ema: float = option(0.9999, "EMA decay of the weights exported for sampling (0 disables the EMA)")
    curriculum_start: int = option(0, "step where log10(tau) starts moving from tau_log10_start")
    curriculum_end: int = option(500_000, "last curriculum step; discrete USDM training afterwards (0: no curriculum)")
    tau_log10_start: float = option(-3.0, "log10 of the softmax temperature tau at the curriculum start")
    tau_log10_end: float = option(-3.0, "log10 of tau at curriculum_end (linear in between)")
    relax_mode: str = option("sparse", "curriculum relaxation: sparse (exact to 1e-6 of weight per token), dense (exact) "
                                   "or topk (Duo++, k rows per token)")
    relax_k: int = option(2, "rows per token of relax_mode=topk")
    gamma_min: float = option(-3.55, "curriculum gamma at t = 0 (least noise)")
    gamma_max: float = option(-1.85, "curriculum gamma at t = 1 (most noise)")
    seed: int = option(0, "random seed (data order, noise, initialisation)")
    device: str = option("auto", "auto (cuda when available), cpu or cuda[:N]")
    fused_loss: bool = option(True, "loss fused with the output projection (rb_loss_linear: no B x L x K logits); "
                                "false: logits, then rb_loss")
    check_every: int = option(100, "every N steps the loss is checked for NaN/inf in the logits (one host sync; 0: never)")
    log_every: int = option(25, "steps between log lines in the JSONL log")
    val_batches: int = option(4, "validation batches for the NELBO before and after training")
    out: str = option("runs/duo", "output folder: log.jsonl, export/ (HF layout) and summary.json")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.length < 2 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("length >= 2, batch_size >= 1 and steps >= 1 are required")
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"gamma_min ({self.gamma_min}) must be below gamma_max ({self.gamma_max})")
        if self.curriculum_end and self.curriculum_end < self.curriculum_start:
            raise ValueError("curriculum_end must not precede curriculum_start")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.relax_mode not in ("sparse", "dense", "topk") or self.relax_k < 1:
            raise ValueError(f"relax_mode must be sparse, dense or topk and relax_k >= 1, got {self.relax_mode!r}, "
                             f"{self.relax_k}")


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The public recipes (section 9): OpenWebText at L = 1024, LM1B at L = 128.
    "owt": dict(model="small", dataset="openwebtext", tokenizer="gpt2", length=1024, batch_size=512,
                gamma_min=-3.55, gamma_max=-1.85, curriculum_end=500_000),
    "lm1b": dict(model="small", dataset="lm1b", tokenizer="bert-base-uncased", length=128, batch_size=512,
                 gamma_min=-3.5, gamma_max=-1.75, curriculum_end=500_000),
    # A CPU demo on the bundled corpus: curriculum for 250 steps, then the discrete phase.
    "demo": dict(model="tiny", dataset="bundled", tokenizer="bundled", tokenizer_vocab=1024, length=64,
                 batch_size=16, steps=500, lr=3e-3, warmup_steps=20, ema=0.0, dropout=0.0,
                 curriculum_end=250, tau_log10_start=-1.0, tau_log10_end=-2.0, gamma_min=-3.5, gamma_max=-1.75,
                 log_every=20, val_batches=8, out="runs/demo"),
}


def tau_at(cfg: TrainConfig, step: int) -> float:
    """``tau`` of the curriculum at ``step`` (section 5): log10 linear from start to end."""
    if step <= cfg.curriculum_start or cfg.curriculum_end <= cfg.curriculum_start:
        return 10.0 ** cfg.tau_log10_start
    frac = min(1.0, (step - cfg.curriculum_start) / (cfg.curriculum_end - cfg.curriculum_start))
    return 10.0 ** (cfg.tau_log10_start + frac * (cfg.tau_log10_end - cfg.tau_log10_start))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    return dev


class Trainer:
    """Holds the model, optimiser, data and T table of one run; ``loss_on(x0, step)`` is the
    objective of one batch, ``step(x0, step)`` one optimizer update."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.tokenizer = get_tokenizer(cfg.tokenizer, cfg.tokenizer_vocab)
        K = len(self.tokenizer)
        self.train_blocks = blocks_from_documents(self.tokenizer, load_text_documents(cfg.dataset, "train"), cfg.length)
        self.val_blocks = blocks_from_documents(self.tokenizer, load_text_documents(cfg.dataset, "validation"),
                                                cfg.length)
        self.model = DiT(DiTConfig.from_name(cfg.model, vocab_size=K, model_length=cfg.length,
                                             dropout=cfg.dropout)).to(self.device)
        self.ema_model = copy.deepcopy(self.model).eval() if cfg.ema > 0 else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                     weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
        self.ttable = None
        if cfg.curriculum_end > 0:
            self.ttable = TTable.build(K, min(-5.0, cfg.gamma_min), max(-1.0, cfg.gamma_max))
            self.ttable.check_vocab(K)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.seed_gen = torch.Generator().manual_seed(cfg.seed + 3)      # seeds of the in-kernel noise
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def next_batch(self) -> Tensor:
        """The next ``batch_size`` blocks of a seeded permutation, reshuffled every epoch."""
        B = self.cfg.batch_size
        if self.train_blocks.shape[0] < B:
            raise ValueError(f"only {self.train_blocks.shape[0]} training blocks for a batch of {B}")
        if self._pos + B > self._order.numel():
            self._order = torch.randperm(self.train_blocks.shape[0], generator=self.data_gen)
            self._pos = 0
        idx = self._order[self._pos:self._pos + B]
        self._pos += B
        return self.train_blocks[idx].to(self.device)

    def in_curriculum(self, step: int) -> bool:
        return self.ttable is not None and step < self.cfg.curriculum_end

    def loss_on(self, x0: Tensor, step: int, model: DiT | None = None, discrete: bool = False) -> Tensor:
        """Mean per-token NELBO of batch ``x0`` (B, L) at training step ``step``."""
        model = model or self.model
        cfg = self.cfg
        B = x0.shape[0]
        K = self.vocab_size
        if self.in_curriculum(step) and not discrete:
            t = ref.stratified_times(B, generator=self.gen, device=self.device, dtype=torch.float64)
            gamma = cfg.gamma_min + t * (cfg.gamma_max - cfg.gamma_min)
            alpha, dT = self.ttable.alpha_and_derivative(gamma)
            dalpha = (cfg.gamma_max - cfg.gamma_min) * dT
            seed = int(torch.randint(0, 2**62, (1,), generator=self.seed_gen))
            h0, zt = relaxed_embedding(x0, gamma, tau_at(cfg, step), model.vocab_embed.embedding, seed=seed,
                                       mode=cfg.relax_mode, k=cfg.relax_k)
            inputs, embeds = None, h0
        else:
            zt, alpha, dalpha = discrete_nelbo_draws(x0, K, self.gen)
            inputs, embeds = zt, None
        sigma = (-torch.log(alpha)).float()
        check = cfg.check_every > 0 and step % cfg.check_every == 0
        if not cfg.fused_loss:
            return rb_loss(model(inputs, sigma, inputs_embeds=embeds), zt, x0, alpha, dalpha, check=check).mean()
        h = model(inputs, sigma, inputs_embeds=embeds, return_hidden=True)
        if h.is_cuda and model.autocast:
            h = h.to(torch.bfloat16)                    # the projection runs in bf16 as under autocast
        lin = model.output_layer.linear
        return rb_loss_linear(h, lin.weight, lin.bias, zt, x0, alpha, dalpha, check=check).mean()

    def step(self, x0: Tensor, step: int) -> tuple[float, float]:
        self.model.train()
        loss = self.loss_on(x0, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        self.opt.step()
        self.sched.step()
        if self.ema_model is not None:
            with torch.no_grad():
                for pe, p in zip(self.ema_model.parameters(), self.model.parameters()):
                    pe.lerp_(p, 1 - self.cfg.ema)
        return float(loss.detach()), float(gn)

    @torch.no_grad()
    def validate(self, model: DiT | None = None) -> float:
        """Discrete NELBO (nats/token) on the first ``val_batches`` validation batches, with a
        fixed seed so that calls are comparable."""
        model = model or (self.ema_model if self.ema_model is not None else self.model)
        model.eval()
        saved = self.gen.get_state()
        self.gen.manual_seed(12345)
        B = self.cfg.batch_size
        losses = []
        for i in range(min(self.cfg.val_batches, max(1, self.val_blocks.shape[0] // B))):
            x0 = self.val_blocks[i * B:(i + 1) * B].to(self.device)
            losses.append(float(self.loss_on(x0, step=0, model=model, discrete=True)))
        self.gen.set_state(saved)
        return sum(losses) / len(losses)

    def export(self, path: str | Path, step: int) -> Path:
        model = self.ema_model if self.ema_model is not None else self.model
        extra = {"tokenizer": self.cfg.tokenizer, "tokenizer_vocab": self.cfg.tokenizer_vocab, "step": step,
                 "weights": "ema" if self.ema_model is not None else "raw"}
        return save_hf_folder(model, path, extra=extra)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; writes ``out/log.jsonl``, ``out/export`` and ``out/summary.json``."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tr = Trainer(cfg)
    K, L, B = tr.vocab_size, cfg.length, cfg.batch_size
    print(f"duo-fast train: {cfg.model} model ({sum(p.numel() for p in tr.model.parameters()) / 1e6:.1f}M params), "
          f"K={K}, L={L}, batch={B}, {tr.train_blocks.shape[0]} train / {tr.val_blocks.shape[0]} val blocks, "
          f"device={tr.device}, curriculum for {min(cfg.curriculum_end, cfg.steps)} of {cfg.steps} steps")
    val_start = tr.validate(tr.model)
    val_curriculum = None
    losses: dict[str, list[float]] = {"curriculum": [], "discrete": []}
    phase_tokens = {"curriculum": 0, "discrete": 0}
    phase_seconds = {"curriculum": 0.0, "discrete": 0.0}
    log = open(out / "log.jsonl", "w")
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc="train", dynamic_ncols=True)
    for step in bar:
        x0 = tr.next_batch()
        phase = "curriculum" if tr.in_curriculum(step) else "discrete"
        t0 = time.perf_counter()
        loss, gn = tr.step(x0, step)
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
        phase_seconds[phase] += time.perf_counter() - t0
        phase_tokens[phase] += B * L
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        losses[phase].append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", phase=phase[:5])
        if phase == "curriculum" and step + 1 == cfg.curriculum_end and step + 1 < cfg.steps:
            val_curriculum = tr.validate()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": loss, "grad_norm": gn, "lr": tr.sched.get_last_lr()[0], "phase": phase,
                   "tau": tau_at(cfg, step) if phase == "curriculum" else None}
            log.write(json.dumps(rec) + "\n")
            log.flush()
    log.close()
    val_end = tr.validate()
    export = tr.export(out / "export", cfg.steps)
    phases = {}
    for k, v in losses.items():
        if v:
            n = max(1, min(20, len(v) // 4))
            phases[k] = {"steps": len(v), "loss_first": sum(v[:n]) / n, "loss_last": sum(v[-n:]) / n, "window": n}
    summary = {
        "train_loss": phases, "val_nelbo_start": val_start, "val_nelbo_after_curriculum": val_curriculum,
        "val_nelbo_end": val_end,
        "val_ppl_bound_end": math.exp(min(val_end, 50.0)),
        "tokens_per_s": {k: phase_tokens[k] / phase_seconds[k] for k in phase_tokens if phase_seconds[k] > 0},
        "export": str(export), "config": dataclasses.asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for k, v in phases.items():
        print(f"train loss, {k} phase ({v['steps']} steps; mean of {v['window']}, noisy: one t per sequence): "
              f"start {v['loss_first']:.4f} -> end {v['loss_last']:.4f}")
    mid = f" -> after the curriculum {val_curriculum:.4f}" if val_curriculum is not None else ""
    print(f"validation NELBO (discrete loss, nats/token, fixed seed): start {val_start:.4f}{mid} -> end {val_end:.4f} "
          f"(perplexity bound {summary['val_ppl_bound_end']:.1f})")
    for k, v in summary["tokens_per_s"].items():
        print(f"training throughput, {k} phase: {v:,.0f} tokens/s")
    print(f"exported {'EMA' if tr.ema_model is not None else 'raw'} weights to {export}")
    return summary
