"""Duo training: the Gaussian-latent curriculum, then USDM, in one process (plain PyTorch) or
under DeepSpeed ZeRO 1-3 on any number of processes (``torchrun`` / ``deepspeed`` launchers).

Per step (docs/math.md sections 3-5): stratified times ``t``; during the curriculum
``gamma_t = gamma_min + t (gamma_max - gamma_min)``, ``alpha_t = T(gamma_t)``,
``alpha'_t = (gamma_max - gamma_min) T'(gamma_t)``, Gaussian latents ``w = at e_x + st eps``,
``z_t = argmax w`` and the denoiser's input is the relaxed ``softmax(w / tau) @ E``
(``ops.relaxed_embedding``: the noise never exists as a B x L x K tensor); afterwards
``z_t ~ q_t`` under the log-linear schedule and the input is ``E[z_t]``. The loss is the
Rao-Blackwellized NELBO at ``(z_t, alpha_t, alpha'_t)`` in both phases (``ops.rb_loss_linear``
by default: fused with the output projection).

Runs survive crashes: resumable checkpoints (engine shards, optimizer, schedule, EMA, data
position, every rank's RNG states, metrics so far) are written to a temporary folder and renamed
when complete, the previous one kept until then; SIGTERM/SIGINT write one before exiting; a
restart with the same command continues from the newest complete one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import reference as ref
from . import runfolder
from .checkpoint import save_hf_folder
from .data import get_tokenizer, loss_mask_id
from .data.blocks import BlockOrder, cached_blocks
from .devices import device_peaks, resolve_device
from .engine import DeepSpeedEngine, TorchEngine, barrier, init_distributed, placement
from .environment import environment
from .evaluate import check_scorer, discrete_nelbo_draws
from .model import DiT, DiTConfig
from .ops import rb_loss, rb_loss_linear, relaxed_embedding
from .ops.relaxed import resolve_mode
from .options import option
from .resume import (
    StopFlag,
    gather_ints,
    generator_states,
    latest_checkpoint,
    load_newest,
    mean_over_ranks,
    read_checkpoint,
    set_generator_states,
    write_checkpoint,
)
from .schedules import lr_multiplier
from .steploop import (
    BatchFeeder,
    IntervalMeter,
    agreed_stop,
    continue_ema,
    ema_decay,
    exit_after_checkpoint,
    micro_seed,
    open_wandb,
)
from .ttable import TTable

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train", "Trainer", "DuoObjective", "tau_at", "resolve_device",
           "latest_checkpoint"]


@dataclass
class TrainConfig:
    """Every option of ``duo-fast train``; the defaults are the public recipe's where it has one."""

    model: str = option("small", "denoiser preset (docs/math.md section 7)", choices=("tiny", "small", "medium"))
    dataset: str = option("bundled", "bundled, openwebtext, wikitext103, wikitext2, lm1b (padded sentences, the "
                                     "public data=lm1b), lm1b-wrap (wrapped), or text:PATH (.txt/.jsonl)")
    tokenizer: str = option("bundled", "'bundled' (BPE trained on the bundled corpus), a local folder or a hub name")
    tokenizer_vocab: int = option(4096, "vocabulary size of the bundled BPE tokenizer")
    length: int = option(1024, "sequence length L of the training blocks")
    batch_size: int = option(512, "sequences per optimizer step")
    steps: int = option(1_000_000, "optimizer steps")
    lr: float = option(3e-4, "AdamW learning rate after warm-up")
    warmup_steps: int = option(2500, "linear warm-up steps (the first update has learning rate 0, as in the public "
                                     "trainer)")
    lr_schedule: str = option("constant", "after the warm-up: constant, cosine (decay to 1e-6 at the last step) or step "
                                          "(halved every lr_halve_every steps); docs/training.md",
                              choices=("constant", "cosine", "step"))
    lr_halve_every: int = option(10_000, "steps between halvings of lr_schedule=step")
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
    relax_mode: str = option("auto", "curriculum relaxation: auto (adaptive where it provably fits its row cap at this "
                                 "tau, else sparse), adaptive (exact top-k, rows not drawn <= 1e-6 of the top "
                                 "weight), sparse (exact to 1e-6 of weight per token), dense (exact) or topk (Duo++, "
                                 "k rows per token)", choices=("auto", "adaptive", "sparse", "dense", "topk"))
    relax_k: int = option(2, "rows per token of relax_mode=topk")
    gamma_min: float = option(-3.55, "curriculum gamma at t = 0 (least noise)")
    gamma_max: float = option(-1.85, "curriculum gamma at t = 1 (most noise)")
    init_from: str = option("", "start from these weights instead of a random initialisation: a duo-fast export, a HF "
                                "folder, a hub id or the public trainer's .ckpt (same model size, length and "
                                "vocabulary); a .ckpt's EMA (shadow weights, decay, update count) is continued")
    init_weights: str = option("raw", "which weights of a .ckpt --init-from starts the model from: raw (as the "
                                      "public finetune_path) or ema", choices=("raw", "ema"))
    seed: int = option(0, "random seed (data order, noise, initialisation)")
    device: str = option("auto", "auto (cuda when available), cpu or cuda[:N]")
    zero_stage: int = option(0, "0: plain PyTorch in one process; 1, 2, 3: DeepSpeed ZeRO stage (any number of "
                                "processes, launched by torchrun or deepspeed)", choices=(0, 1, 2, 3))
    micro_batch_size: int = option(0, "sequences per rank per forward/backward (0: batch_size / world size); "
                                      "batch_size must be a multiple of micro_batch_size x world size")
    save_every: int = option(0, "steps between resumable checkpoints in OUT/checkpoints (0: only at the end and "
                                "on SIGTERM/SIGINT)")
    resume: bool = option(True, "continue the run in OUT from its newest complete checkpoint (a different "
                                "configuration is refused); off: a non-empty OUT is refused")
    overwrite: bool = option(False, "use OUT even if it holds another run: the old folder is moved aside to "
                                    "OUT.old-TIME, never deleted")
    keep_checkpoints: int = option(2, "complete checkpoints kept in OUT/checkpoints (the newest N)")
    tensorboard: bool = option(False, "also log to TensorBoard (OUT/tb) when tensorboard is installed")
    fused_loss: bool = option(True, "loss fused with the output projection (rb_loss_linear: no B x L x K logits); "
                                "false: logits, then rb_loss")
    check_every: int = option(100, "every N steps (a multiple of log_every: a log step) the logits are checked for "
                                   "NaN/inf by name (0: never); between checks a non-finite step is skipped on the device")
    log_every: int = option(25, "steps between log lines in the JSONL log (the only steps that read from the device)")
    compile: bool = option(False, "torch.compile the denoiser's blocks")
    val_batches: int = option(4, "validation batches for the NELBO (the same fixed batches and noise at every validation)")
    val_every: int = option(5000, "steps between validations during training (the public val_check_interval): NELBO "
                                  "of the EMA weights, logged, and the best weights exported to OUT/best (0: only "
                                  "before training, after the curriculum and at the end)")
    val_samples: int = option(0, "samples drawn at each validation for their unigram entropy (and generative "
                                 "perplexity with val_gen_ppl_model); 0: none")
    val_sample_steps: int = option(1000, "sampling steps of those samples (the public sampling.steps)")
    val_gen_ppl_model: str = option("", "causal LM (hub name or local folder; the public code uses gpt2-large) that "
                                        "scores the validation samples, public protocol")
    wandb: bool = option(False, "also log to Weights & Biases (project wandb_project) when wandb is installed")
    wandb_project: str = option("duo-fast", "W&B project of --wandb")
    val_fraction: float = option(0.05, "share of the documents of a local text:PATH data set held out for "
                                       "validation (a fixed, seeded choice; never trained on)")
    out: str = option("runs/duo", "output folder: log.jsonl, export/ (HF layout) and summary.json")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.length < 2 or self.batch_size < 1 or self.steps < 1:
            raise ValueError(f"--length must be >= 2, --batch-size and --steps >= 1; got {self.length}, "
                             f"{self.batch_size}, {self.steps}")
        if self.val_batches < 1:
            raise ValueError(f"--val-batches must be >= 1, got {self.val_batches}")
        if self.val_every < 0 or self.val_samples < 0 or self.val_sample_steps < 1:
            raise ValueError(f"--val-every and --val-samples must be >= 0 and --val-sample-steps >= 1; got "
                             f"{self.val_every}, {self.val_samples}, {self.val_sample_steps}")
        if self.val_gen_ppl_model and self.val_samples < 1:
            raise ValueError("--val-gen-ppl-model needs --val-samples >= 1 (the samples it scores)")
        if self.tokenizer == "bundled" and self.tokenizer_vocab < 300:
            raise ValueError(f"--tokenizer-vocab must be >= 300 (256 bytes, 4 special tokens and merges), "
                             f"got {self.tokenizer_vocab}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"gamma_min ({self.gamma_min}) must be below gamma_max ({self.gamma_max})")
        if self.curriculum_end and self.curriculum_end < self.curriculum_start:
            raise ValueError("curriculum_end must not precede curriculum_start")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0 (no DeepSpeed), 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch_size < 0 or self.save_every < 0:
            raise ValueError("micro_batch_size and save_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.log_every < 1 or self.check_every < 0 or (self.check_every and self.check_every % self.log_every):
            raise ValueError(f"--log-every must be >= 1 and --check-every a multiple of it (or 0), got "
                             f"{self.log_every}, {self.check_every}")
        if self.relax_mode not in ("auto", "adaptive", "sparse", "dense", "topk") or self.relax_k < 1:
            raise ValueError(f"relax_mode must be auto, adaptive, sparse, dense or topk and relax_k >= 1, got "
                             f"{self.relax_mode!r}, {self.relax_k}")


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The public recipes (section 9): OpenWebText at L = 1024, LM1B at L = 128.
    "owt": dict(model="small", dataset="openwebtext", tokenizer="gpt2", length=1024, batch_size=512,
                gamma_min=-3.55, gamma_max=-1.85, curriculum_end=500_000),
    "lm1b": dict(model="small", dataset="lm1b", tokenizer="bert-base-uncased", length=128, batch_size=512,
                 gamma_min=-3.5, gamma_max=-1.75, curriculum_end=500_000),
    "lm1b-wrap": dict(model="small", dataset="lm1b-wrap", tokenizer="bert-base-uncased", length=128, batch_size=512,
                      gamma_min=-3.5, gamma_max=-1.75, curriculum_end=500_000),
    # A CPU demo on the bundled corpus: curriculum for 250 steps, then the discrete phase.
    "demo": dict(model="tiny", dataset="bundled", tokenizer="bundled", tokenizer_vocab=1024, length=64,
                 batch_size=16, steps=500, lr=3e-3, warmup_steps=20, ema=0.0, dropout=0.0,
                 curriculum_end=250, tau_log10_start=-1.0, tau_log10_end=-2.0, gamma_min=-3.5, gamma_max=-1.75,
                 log_every=20, val_batches=8, val_every=100, out="runs/demo"),
}


def tau_at(cfg: TrainConfig, step: int) -> float:
    """``tau`` of the curriculum at ``step`` (section 5): log10 linear from start to end."""
    if step <= cfg.curriculum_start or cfg.curriculum_end <= cfg.curriculum_start:
        return 10.0 ** cfg.tau_log10_start
    frac = min(1.0, (step - cfg.curriculum_start) / (cfg.curriculum_end - cfg.curriculum_start))
    return 10.0 ** (cfg.tau_log10_start + frac * (cfg.tau_log10_end - cfg.tau_log10_start))


class DuoObjective(nn.Module):
    """The training objective as one module around the denoiser, so that an engine (and ZeRO-3's
    parameter gathering) sees every parameter the step uses, including the input embedding read
    by the relaxation and the output projection read by the fused loss.

    ``forward(x0, sigma, alpha, dalpha, zt=None, gamma=None, tau=None, seed=None, check=False)``:
    the discrete objective at ``zt``, or (``gamma`` given) the curriculum's; returns the mean loss
    per token, over the tokens of ``x0`` that are not ``pad_id`` when it is given (padded data,
    as the public loss weights by the attention mask)."""

    def __init__(self, dit: DiT, cfg: "TrainConfig", pad_id: int | None = None) -> None:
        super().__init__()
        self.dit, self.cfg, self.pad_id = dit, cfg, pad_id
        self.relax_stats: dict[str, Any] = {}      # the last curriculum step's relaxation (mode, bound: device tensors)

    def register_external_parameters(self) -> None:
        """ZeRO-3: these parameters are read outside their own modules' forward."""
        import deepspeed

        for p in (self.dit.vocab_embed.embedding, self.dit.output_layer.linear.weight, self.dit.output_layer.linear.bias):
            deepspeed.zero.register_external_parameter(self, p)

    def forward(self, x0: Tensor, sigma: Tensor, alpha: Tensor, dalpha: Tensor, zt: Tensor | None = None,
                gamma: Tensor | None = None, tau: float | None = None, seed: int | None = None,
                check: bool = False) -> Tensor:
        cfg, dit = self.cfg, self.dit
        if gamma is not None:
            E = dit.vocab_embed.embedding
            mode, k_max = resolve_mode(cfg.relax_mode, tau, E.shape[0], cfg.gamma_max)
            self.relax_stats = {"mode": mode}
            h0, zt = relaxed_embedding(x0, gamma, tau, E, seed=seed, mode=mode, k=cfg.relax_k, k_max=k_max,
                                       stats=self.relax_stats if mode == "adaptive" else None)
            inputs, embeds = None, h0
        else:
            inputs, embeds = zt, None
        if not cfg.fused_loss:
            losses = rb_loss(dit(inputs, sigma, inputs_embeds=embeds), zt, x0, alpha, dalpha, check=check)
        else:
            h = dit(inputs, sigma, inputs_embeds=embeds, return_hidden=True)
            lin = dit.output_layer.linear
            losses = rb_loss_linear(h, lin.weight, lin.bias, zt, x0, alpha, dalpha, check=check)
        if self.pad_id is None:
            return losses.mean()
        keep = (x0 != self.pad_id).to(losses.dtype)
        return (losses * keep).sum() / keep.sum().clamp_min(1.0)


class Trainer:
    """Holds the model, engine, data and T table of one run on this rank. ``loss_on(x0, step)``
    is the objective of one micro-batch, ``step(x0, step)`` one optimizer update from one batch
    (plain engine), ``train_step(step)`` one optimizer update from this rank's micro-batches."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device, self.rank, self.world, micro, self.accum = placement(
            resolve_device(cfg.device), cfg.batch_size, cfg.micro_batch_size, cfg.zero_stage)
        self.micro = micro
        torch.manual_seed(cfg.seed)
        self.tokenizer = get_tokenizer(cfg.tokenizer, cfg.tokenizer_vocab)
        K = len(self.tokenizer)
        tok_key = f"{cfg.tokenizer}-{cfg.tokenizer_vocab}" if cfg.tokenizer == "bundled" else cfg.tokenizer
        vf = cfg.val_fraction
        if self.rank == 0:                               # rank 0 tokenises and caches; the others map the cache
            cached_blocks(cfg.dataset, "train", self.tokenizer, tok_key, cfg.length, val_fraction=vf)
            cached_blocks(cfg.dataset, "validation", self.tokenizer, tok_key, cfg.length, val_fraction=vf)
        init_distributed(self.device)
        barrier()
        self.train_blocks = cached_blocks(cfg.dataset, "train", self.tokenizer, tok_key, cfg.length, val_fraction=vf)
        self.val_blocks = cached_blocks(cfg.dataset, "validation", self.tokenizer, tok_key, cfg.length,
                                        val_fraction=vf)
        if self.train_blocks.shape[0] < cfg.batch_size:
            raise ValueError(f"only {self.train_blocks.shape[0]} training blocks for a batch of {cfg.batch_size}")
        self.order = BlockOrder(self.train_blocks.shape[0], micro, seed=cfg.seed + 2, rank=self.rank, world=self.world)
        self.feeder = BatchFeeder(self.train_blocks, self.order, self.device)
        self.model = DiT(DiTConfig.from_name(cfg.model, vocab_size=K, model_length=cfg.length,
                                             dropout=cfg.dropout)).to(self.device)
        init_ema = _init_from(self.model, cfg) if cfg.init_from else None
        if cfg.compile:
            self.model.compile_blocks()
        self.pad_id = loss_mask_id(cfg.dataset, self.tokenizer)
        if cfg.val_gen_ppl_model:
            check_scorer(cfg.val_gen_ppl_model)
        self.objective = DuoObjective(self.model, cfg, self.pad_id)
        args = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                    lr_lambda=lr_multiplier(cfg.lr_schedule, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_halve_every),
                    grad_clip=cfg.grad_clip)
        if cfg.zero_stage:
            if cfg.zero_stage == 3:
                self.objective.register_external_parameters()
            self.engine = DeepSpeedEngine(self.objective, cfg.zero_stage, micro, self.accum, self.world,
                                          device=self.device, **args)
            self._forward = self.engine.engine
        else:
            self.engine = TorchEngine(self.objective, accum=self.accum, **args)
            self._forward = self.objective
        with self.engine.gathered():
            self.ema = [p.detach().float().clone() for p in self.model.parameters()] if cfg.ema > 0 else None
        self.ema_updates, self.ema_decay = 0, cfg.ema
        if init_ema is not None and self.ema is not None:      # the checkpoint's EMA, decay and count continue
            self.ema_decay, self.ema_updates = continue_ema(self.ema, self.model, init_ema, cfg.ema)
        self.ttable = None
        if cfg.curriculum_end > 0:
            self.ttable = TTable.build(K, min(-5.0, cfg.gamma_min), max(-1.0, cfg.gamma_max))
            self.ttable.check_vocab(K)
        # the noise of each micro-batch is reseeded from (seed, step, slot): see duo_fast.steploop
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def next_batch(self) -> Tensor:
        """This rank's next micro-batch of blocks (a seeded permutation per epoch, sharded by rank)."""
        return self.feeder.next()[0]

    def in_curriculum(self, step: int) -> bool:
        return self.ttable is not None and step < self.cfg.curriculum_end

    def _inputs(self, x0: Tensor, step: int, discrete: bool, kernel_seed: int, slot: int | None) -> dict[str, Any]:
        """The random part of one objective evaluation (section 3-5), drawn from ``self.gen``.
        ``slot`` (training micro-batches): the times are this micro-batch's slice of strata over
        the global batch, as the public trainer draws them; None: strata over ``x0`` alone."""
        cfg = self.cfg
        strata, first = None, 0
        if slot is not None:
            rank, j = slot % self.world, slot // self.world
            strata, first = cfg.batch_size, (rank * self.accum + j) * x0.shape[0]
        if self.in_curriculum(step) and not discrete:
            t = ref.stratified_times(x0.shape[0], generator=self.gen, device=self.device, dtype=torch.float64,
                                     strata=strata, first=first)
            gamma = cfg.gamma_min + t * (cfg.gamma_max - cfg.gamma_min)
            alpha, dT = self.ttable.alpha_and_derivative(gamma)
            seed = kernel_seed
            return dict(sigma=(-torch.log(alpha)).float(), alpha=alpha, dalpha=(cfg.gamma_max - cfg.gamma_min) * dT,
                        gamma=gamma, tau=tau_at(cfg, step), seed=seed)
        zt, alpha, dalpha = discrete_nelbo_draws(x0, self.vocab_size, self.gen, strata=strata, first=first)
        return dict(sigma=(-torch.log(alpha)).float(), alpha=alpha, dalpha=dalpha, zt=zt)

    def checks_at(self, step: int) -> bool:
        """Whether ``step`` runs the checked mode (a host read; only ever on a log step)."""
        return self.cfg.check_every > 0 and step % self.cfg.check_every == 0

    def loss_on(self, x0: Tensor, step: int, model: DiT | None = None, discrete: bool = False, slot: int = 0,
                check: bool = False, training: bool = True) -> Tensor:
        """Mean per-token NELBO of micro-batch ``x0`` (B, L) at training step ``step``; its noise
        comes from ``(seed, step, slot)``; ``training``: its times are its slice of the global
        batch's strata (else strata over ``x0``: validation)."""
        self.gen.manual_seed(micro_seed(self.cfg.seed, step, slot, 1))
        torch.manual_seed(micro_seed(self.cfg.seed, step, slot, 2))          # dropout
        inputs = self._inputs(x0, step, discrete, micro_seed(self.cfg.seed, step, slot, 3), slot if training else None)
        if model is None:
            return self._forward(x0, check=check, **inputs)
        return DuoObjective(model, self.cfg, self.pad_id)(x0, check=check, **inputs)

    def train_step(self, step: int, check: bool = False) -> tuple[Tensor, Tensor, list[int]]:
        """One optimizer update from ``accum`` micro-batches of this rank, with no host read.
        Returns (mean loss: 0-d device tensor, skipped: 0-d device bool, True when the loss was
        not finite and the update was skipped; crc32 checksums of the micro-batches' block
        indices, computed on the CPU)."""
        self.objective.train()
        losses, sums = [], []
        for j in range(self.accum):
            x0, crc = self.feeder.next()
            sums.append(crc)
            loss = self.loss_on(x0, step, slot=j * self.world + self.rank, check=check)
            self.engine.backward(loss)
            bad = ~torch.isfinite(loss.detach())
            self.engine.step(bad)
            losses.append(loss.detach())
        mean = torch.stack(losses).mean() if len(losses) > 1 else losses[0]
        self._update_ema()
        return mean, ~torch.isfinite(mean), sums

    def step(self, x0: Tensor, step: int) -> tuple[float, float]:
        """One optimizer update on the given batch (single process, plain engine); reads the
        loss and gradient norm back (tests and notebooks, not the training loop)."""
        if not isinstance(self.engine, TorchEngine) or self.accum != 1:
            raise RuntimeError("Trainer.step(x0) needs the plain engine without accumulation; use train_step()")
        self.objective.train()
        loss = self.loss_on(x0, step)
        self.engine.backward(loss)
        self.engine.step(~torch.isfinite(loss.detach()))
        self._update_ema()
        return float(loss.detach()), self.engine.grad_norm()

    def _update_ema(self) -> None:
        """The public EMA: decay ``min(ema, (1 + n)/(10 + n))`` at its ``n``-th update (a host count)."""
        if self.ema is None:
            return
        self.ema_updates += 1
        with torch.no_grad(), self.engine.gathered():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()],
                                 1 - ema_decay(self.ema_decay, self.ema_updates))

    def _ema_model(self) -> DiT:
        model = DiT(self.model.config).to(self.device).eval()
        with torch.no_grad():
            for q, e in zip(model.parameters(), self.ema):
                q.copy_(e)
        return model

    @torch.no_grad()
    def validate(self, use_ema: bool = True) -> float:
        """Discrete NELBO (nats/token) on the first ``val_batches`` validation micro-batches,
        with a fixed seed so that calls are comparable (averaged over ranks)."""
        model = self._ema_model() if use_ema and self.ema is not None else None
        self.objective.eval()
        B = self.micro
        losses = []
        for i in range(min(self.cfg.val_batches, max(1, self.val_blocks.shape[0] // B))):
            x0 = self.val_blocks[i * B:(i + 1) * B].to(self.device)
            # a fixed stream per validation batch (step -1), the same at every call
            losses.append(self.loss_on(x0, step=-1, model=model, discrete=True, slot=i * self.world + self.rank,
                                       training=False))
        value = float(torch.stack(losses).mean())
        return mean_over_ranks(value, self.device)

    def sample_metrics(self, step: int) -> dict[str, Any]:
        """``val_samples`` samples of the EMA (or raw) weights: their unigram entropy and, with
        ``val_gen_ppl_model``, their generative perplexity (public protocol). Rank 0 samples;
        the other ranks return {} (a collective only to gather ZeRO-3 weights)."""
        from .evaluate import sample_metrics

        cfg = self.cfg
        with self.engine.gathered():
            if self.rank != 0:
                return {}
            model = self._ema_model() if self.ema is not None else copy.deepcopy(self.model).eval()
        return sample_metrics(model, self.tokenizer, cfg.val_samples, cfg.val_sample_steps, cfg.length, cfg.seed + step,
                              self.device, cfg.val_gen_ppl_model)

    def export(self, path: str | Path, step: int) -> Path | None:
        """The EMA (or raw) weights in the public HF layout, written by rank 0."""
        extra = {"tokenizer": self.cfg.tokenizer, "tokenizer_vocab": self.cfg.tokenizer_vocab, "step": step,
                 "weights": "ema" if self.ema is not None else "raw"}
        with self.engine.gathered():
            if self.rank != 0:
                return None
            if self.ema is not None:
                return save_hf_folder(self._ema_model(), path, extra=extra)
            return save_hf_folder(self.model, path, extra=extra)

    # -- resumable checkpoints -------------------------------------------------------------

    def _gens(self) -> dict[str, torch.Generator]:
        return {"gen": self.gen}

    def save_checkpoint(self, root: Path, step: int, metrics: dict[str, Any]) -> Path:
        """A resumable checkpoint after ``step`` (a collective; see ``duo_fast.resume``)."""
        shared = {"step": step, "ema": self.ema, "ema_updates": self.ema_updates, "ema_decay": self.ema_decay,
                  "metrics": metrics, "world": self.world,
                  "vocab_size": self.vocab_size, "config": dataclasses.asdict(self.cfg)}
        mine = {"rng": generator_states(self._gens(), self.device), "order": self.feeder.state_dict()}
        return write_checkpoint(root, step, self.engine, self.rank, shared, mine, keep=self.cfg.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore everything ``save_checkpoint`` wrote; returns the shared state (step, metrics).
        Nothing in ``path`` can run code (``duo_fast.resume``)."""
        from .resume import _load_plain

        shared = _load_plain(path / "state.pt")
        if shared["world"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {shared['world']} processes, this run has {self.world}")
        if shared["vocab_size"] != self.vocab_size:
            raise ValueError(f"checkpoint {path} has a vocabulary of {shared['vocab_size']}, but the tokenizer "
                             f"{self.cfg.tokenizer!r} gives {self.vocab_size}: they do not belong together")
        shared, mine = read_checkpoint(path, self.engine, self.rank)
        set_generator_states(self._gens(), mine["rng"], self.device)
        self.feeder.load_state_dict(mine["order"])
        if self.ema is not None:
            self.ema = [e.to(self.device) for e in shared["ema"]]
        self.ema_updates = shared.get("ema_updates", shared["step"] + 1)
        self.ema_decay = shared.get("ema_decay", self.cfg.ema)
        return shared


def _init_from(model: DiT, cfg: TrainConfig) -> dict[str, Any] | None:
    """Load ``cfg.init_from`` into ``model`` (sizes must match); returns a .ckpt's EMA state, if any."""
    from .pretrained import CheckpointError, load_pretrained

    try:
        src, info = load_pretrained(cfg.init_from, ema=cfg.init_weights == "ema")
    except (CheckpointError, FileNotFoundError) as e:
        raise ValueError(f"--init-from {cfg.init_from}: cannot load it: {e}") from e
    have, want = src.config, model.config
    for f in ("vocab_size", "model_length", "hidden_dim", "n_blocks", "n_heads", "cond_dim"):
        if getattr(have, f) != getattr(want, f):
            raise ValueError(f"--init-from {cfg.init_from}: its {f} is {getattr(have, f)}, this run's is "
                             f"{getattr(want, f)} (see --model, --length, --tokenizer)")
    with torch.no_grad():
        model.load_state_dict(src.state_dict())
    return info.ema_state


def _device_sync(device: torch.device) -> None:
    """Wait for the device: only where the loop reads values anyway (log steps, timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops_per_token(cfg: DiTConfig, length: int) -> float:
    """Training FLOPs per token: forward and backward, 3x the forward's
    (:meth:`DiTConfig.forward_flops_per_token`; the curriculum's relaxation is not counted)."""
    return 3.0 * cfg.forward_flops_per_token(length)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; writes ``out/log.jsonl``, ``out/checkpoints``, ``out/export`` and ``out/summary.json``
    (docs/training.md). Returns the summary on rank 0, ``{}`` on the other ranks."""
    run = _TrainRun(cfg)
    run.loop()
    return run.finish()


class _TrainRun:
    """One ``train()`` call: the run folder, the trainer, the loop and its log-step reads."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.out = cfg, Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.config = dataclasses.asdict(cfg)
        # what may be done with --out is decided before any heavy work, and nothing is written yet
        self.folder = runfolder.plan(self.out, self.config, cfg.resume, cfg.overwrite,
                                     latest_checkpoint(self.ckpt_root) is not None)
        self.tr = tr = Trainer(cfg)
        self.rank0 = tr.rank == 0
        if self.rank0:
            runfolder.apply(self.folder, self.config, environment=environment(tr.device))
            if self.folder.moved_to is not None:
                print(f"duo-fast train: the previous contents of {self.out} were moved to {self.folder.moved_to}")
        barrier()
        self.start, self.metrics = 0, {"losses": {"curriculum": [], "discrete": []},
                                       "tokens": {"curriculum": 0, "discrete": 0},
                                       "seconds": {"curriculum": 0.0, "discrete": 0.0}, "val_start": None,
                                       "val_curriculum": None}
        resumed = self._restore() if self.folder.action == "resume" else None
        self._announce(resumed)
        if self.metrics["val_start"] is None:
            self.metrics["val_start"] = tr.validate(use_ema=False)
        peaks = device_peaks(tr.device)
        self.flops_tok, self.peak = model_flops_per_token(tr.model.config, cfg.length), peaks[0] if peaks else None

    def _restore(self) -> Path:
        loaded = load_newest(self.ckpt_root, self.tr.load_checkpoint, self.tr.rank)
        if loaded is None:
            raise ValueError(f"--out {self.out}: no complete checkpoint could be read")
        resumed, state = loaded
        self.start, self.metrics = state["step"] + 1, state["metrics"]
        if self.rank0:
            runfolder.note_resume(self.folder, state["step"], resumed, "train")
        return resumed

    def _announce(self, resumed: Path | None) -> None:
        cfg, tr = self.cfg, self.tr
        if not self.rank0:
            return
        engine = f"DeepSpeed ZeRO-{cfg.zero_stage}" if cfg.zero_stage else "PyTorch"
        print(f"duo-fast train: {cfg.model} model ({tr.model.config.num_parameters() / 1e6:.1f}M params), "
              f"K={tr.vocab_size}, L={cfg.length}, batch={cfg.batch_size} ({tr.world} x {tr.micro} x {tr.accum} "
              f"accumulation), {engine}, {tr.train_blocks.shape[0]} train / {tr.val_blocks.shape[0]} val blocks, "
              f"device={tr.device}, curriculum for {min(cfg.curriculum_end, cfg.steps)} of {cfg.steps} steps"
              + (f"; resumed from {resumed} at step {self.start}" if resumed is not None else ""))

    def _open_logs(self) -> None:
        self.log = open(self.out / "log.jsonl", "a") if self.rank0 else None
        self.tb = self.wandb = None
        if self.cfg.tensorboard and self.rank0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:
                print("duo-fast train: tensorboard is not installed; logging to log.jsonl only")
        self.wandb = open_wandb("train", self.cfg.wandb and self.rank0, self.cfg.wandb_project, self.out, self.config)

    def loop(self) -> None:
        """The steps; host reads only at log, save and stop points (``_read_interval``)."""
        from tqdm.auto import tqdm

        cfg, tr = self.cfg, self.tr
        self._open_logs()
        stop = StopFlag()
        self.show_bar = cfg.progress and self.rank0 and sys.stderr.isatty()
        self.bar = tqdm(range(self.start, cfg.steps), disable=not self.show_bar, desc="train", dynamic_ncols=True,
                        initial=self.start, total=cfg.steps)
        self.meter, self.sums = IntervalMeter(tr.device), []
        _device_sync(tr.device)
        self.t_interval = time.perf_counter()
        try:
            for step in self.bar:
                phase = "curriculum" if tr.in_curriculum(step) else "discrete"
                last_of_phase = step == cfg.steps - 1 or (phase == "curriculum" and step + 1 == cfg.curriculum_end)
                logging = step % cfg.log_every == 0 or last_of_phase
                loss, bad, sums = tr.train_step(step, check=logging and tr.checks_at(step))
                self.meter.add(step, loss, bad)
                self.sums.append(sums)
                stopping = agreed_stop(stop.after_step(step))
                saving = cfg.save_every > 0 and (step + 1) % cfg.save_every == 0
                validating = cfg.val_every > 0 and (step + 1) % cfg.val_every == 0 and step + 1 < cfg.steps
                if logging or stopping or saving or validating:
                    self._read_interval(step, phase, logging)
                if validating:
                    self._validate_now(step)
                if stopping or saving:
                    path = tr.save_checkpoint(self.ckpt_root, step, self.metrics)
                    if stopping:
                        exit_after_checkpoint("train", stop.signum, step, path, self.rank0)
                    self.t_interval = time.perf_counter()
        finally:
            stop.restore()
            if self.log is not None:
                self.log.close()
                self.log = None

    def _read_interval(self, step: int, phase: str, logging: bool) -> None:
        """The interval's one device read and one collective; the log line; validation after the curriculum."""
        cfg, tr, metrics = self.cfg, self.tr, self.metrics
        _device_sync(tr.device)
        dt = time.perf_counter() - self.t_interval
        read = self.meter.read()
        n_steps, tokens = len(read["steps"]), len(read["steps"]) * cfg.batch_size * cfg.length
        metrics["seconds"][phase] += dt
        metrics["tokens"][phase] += tokens
        finite = [v for v in read["losses"] if math.isfinite(v)]
        metrics["losses"][phase].extend(finite)
        if read["skipped"] and len(read["skipped"]) == n_steps:
            raise FloatingPointError(f"the loss was not finite at every step from {read['steps'][0]} to "
                                     f"{read['steps'][-1]}; no update was applied in that interval")
        if read["skipped"] and self.rank0:
            print(f"duo-fast train: non-finite loss at steps {read['skipped']}: those updates were skipped")
        loss_now = read["losses"][-1]
        if self.show_bar:
            self.bar.set_postfix(loss=f"{loss_now:.3f}", phase=phase[:5])
        checksums = gather_ints(self.sums[-1], tr.device) if logging else None     # every rank or none
        self.sums = []
        if self.rank0 and logging:
            tps = tokens / dt
            rec = {"step": step, "loss": loss_now, "loss_mean": sum(finite) / len(finite) if finite else None,
                   "grad_norm": tr.engine.grad_norm(), "lr": tr.engine.lr(), "phase": phase,
                   "tau": tau_at(cfg, step) if phase == "curriculum" else None, "tokens_per_s": tps,
                   **(self._relaxation_record() if phase == "curriculum" else {}),
                   "mfu": tps * self.flops_tok / self.peak if self.peak else None, "skipped_steps": read["skipped"],
                   "batch_checksums": checksums}
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
            if not self.show_bar and cfg.progress:
                print(f"step {step}/{cfg.steps} {phase} loss {loss_now:.4f} {tps:,.0f} tokens/s", flush=True)
            self._scalars({f"train/{k}": rec[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s")}, step)
        if phase == "curriculum" and step + 1 == cfg.curriculum_end and step + 1 < cfg.steps:
            metrics["val_curriculum"] = tr.validate()
        self.t_interval = time.perf_counter()

    def _relaxation_record(self) -> dict[str, Any]:
        """The last curriculum step's relaxation for the log: its mode and, for adaptive, the
        largest bound achieved, the mean and largest k and the fraction of tokens capped."""
        st = self.tr.objective.relax_stats
        out: dict[str, Any] = {"relax_mode": st.get("mode")}
        for k in ("bound_max", "k_mean", "k_max", "capped"):
            if k in st:
                out[f"relax_{k}"] = float(st[k])
        return out

    def _validate_now(self, step: int) -> float:
        """Validation during training (every ``val_every`` steps, and at the end): the NELBO of
        the EMA weights, optional samples' entropy and generative perplexity, the best weights
        exported to OUT/best; one log record (JSONL, TensorBoard, W&B)."""
        cfg, tr, metrics = self.cfg, self.tr, self.metrics
        value = tr.validate()
        rec: dict[str, Any] = {"step": step, "val_nelbo": value, "val_ppl_bound": math.exp(min(value, 50.0))}
        if cfg.val_samples > 0:
            rec.update(tr.sample_metrics(step))
        best = metrics.get("best") or {}
        if math.isfinite(value) and value < best.get("val_nelbo", math.inf):
            metrics["best"] = {"step": step, "val_nelbo": value}
            tr.export(self.out / "best", step)
            rec["best"] = True
        metrics.setdefault("val_history", []).append(rec)
        if self.rank0:
            if self.log is not None:
                self.log.write(json.dumps(rec) + "\n")
                self.log.flush()
            self._scalars({f"val/{k}": v for k, v in rec.items() if k not in ("step", "best")}, step)
            if cfg.progress and not self.show_bar:
                print(f"step {step}/{cfg.steps} validation NELBO {value:.4f}" + (" (best)" if rec.get("best") else ""),
                      flush=True)
        self.t_interval = time.perf_counter()
        return value

    def _scalars(self, values: dict[str, Any], step: int) -> None:
        """Numbers to TensorBoard and W&B (rank 0)."""
        values = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def finish(self) -> dict[str, Any]:
        """Final checkpoint, validation, export and ``summary.json``."""
        cfg, tr, metrics = self.cfg, self.tr, self.metrics
        if self.rank0:
            self.log = open(self.out / "log.jsonl", "a")
        val_end = self._validate_now(cfg.steps - 1)             # before the checkpoint: it holds the best so far
        if self.log is not None:
            self.log.close()
        if latest_checkpoint(self.ckpt_root) != self.ckpt_root / f"step{cfg.steps - 1:09d}":
            tr.save_checkpoint(self.ckpt_root, cfg.steps - 1, metrics)        # the finished run can be extended
        export = tr.export(self.out / "export", cfg.steps)
        if self.wandb is not None:
            self.wandb.finish()
        if not self.rank0:
            return {}
        phases = {}
        for k, v in metrics["losses"].items():
            if v:
                n = max(1, min(20, len(v) // 4))
                phases[k] = {"steps": len(v), "loss_first": sum(v[:n]) / n, "loss_last": sum(v[-n:]) / n, "window": n}
        tokens_per_s = {k: metrics["tokens"][k] / metrics["seconds"][k] for k in metrics["tokens"]
                        if metrics["seconds"][k] > 0}
        summary = {
            "train_loss": phases, "val_nelbo_start": metrics["val_start"],
            "val_nelbo_after_curriculum": metrics["val_curriculum"], "val_nelbo_end": val_end,
            "val_ppl_bound_end": math.exp(min(val_end, 50.0)), "best": metrics.get("best"),
            "validations": metrics.get("val_history", []), "tokens_per_s": tokens_per_s,
            "mfu": {k: v * self.flops_tok / self.peak for k, v in tokens_per_s.items()} if self.peak else None,
            "world_size": tr.world, "zero_stage": cfg.zero_stage, "export": str(export), "config": self.config,
            "status": "finished", "steps_done": cfg.steps, "environment": environment(tr.device),
        }
        runfolder.write_json_atomic(self.out / "summary.json", summary)
        _print_summary(summary, metrics, tr.ema is not None)
        return summary


def _print_summary(summary: dict[str, Any], metrics: dict[str, Any], ema: bool) -> None:
    for k, v in summary["train_loss"].items():
        print(f"train loss, {k} phase ({v['steps']} steps; mean of {v['window']}, noisy: one t per sequence): "
              f"start {v['loss_first']:.4f} -> end {v['loss_last']:.4f}")
    mid = f" -> after the curriculum {metrics['val_curriculum']:.4f}" if metrics["val_curriculum"] is not None else ""
    print(f"validation NELBO (discrete loss, nats/token, fixed seed): start {metrics['val_start']:.4f}{mid} -> end "
          f"{summary['val_nelbo_end']:.4f} (perplexity bound {summary['val_ppl_bound_end']:.1f})")
    for k, v in summary["tokens_per_s"].items():
        print(f"training throughput, {k} phase: {v:,.0f} tokens/s"
              + (f", MFU {summary['mfu'][k]:.1%}" if summary["mfu"] else ""))
    print(f"exported {'EMA' if ema else 'raw'} weights to {summary['export']}")
