"""Discrete Consistency Distillation (docs/math.md section 6), single process.

The student starts from a trained Duo model; the teacher is a frozen copy refreshed every
``update_every`` optimizer steps (from the student, or from its EMA). In round
``n = step // update_every`` the step gap is ``dt = 2^n / t_grid``, capped at 1 (or, with linear
growth, ``dt_min + (step / steps)(dt_max - dt_min)``). Each step: stratified ``t``, ``t <- clip(t + dt, 0, 1)``,
``s = t - dt``; ``gamma`` linear in time on ``[gamma_min, gamma_max]``; ``alpha = T(gamma)``;
``(z_t, z_s)`` from one shared Gaussian noise by ``ops.coupled_latents`` (O(1) per token, exact);
the student's log-probabilities at ``(z_t, -log alpha_t)`` (with gradient) against the teacher's
at ``(z_s, -log alpha_s)`` (no gradient, float32); loss ``KL(student || teacher)`` (``kl-bwd``) or
``KL(teacher || student)`` (``kl-fwd``) summed over the vocabulary, mean over tokens.

Runs in one process or under DeepSpeed ZeRO 1-3 like ``duo-fast train``, with the same
resumable checkpoints (the teacher, the round and the EMA included) and signal handling. The
teacher is a full copy on every rank (it only runs forward); under ZeRO-3 it is refreshed from
the gathered student.
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
from .data import check_tokenizer_vocab, get_tokenizer, loss_mask_id
from .data.blocks import BlockOrder, cached_blocks
from .engine import DeepSpeedEngine, TorchEngine, barrier, init_distributed, placement
from .environment import environment
from .model import DiT
from .ops import coupled_latents
from .options import option
from .resume import (
    StopFlag,
    generator_states,
    latest_checkpoint,
    load_newest,
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
    warmup_steps: int = option(500, "linear warm-up steps (the first update has learning rate 0, as in the public "
                                    "trainer), then constant")
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)")
    ema: float = option(0.999, "EMA decay of the exported weights (0 disables); with init=public and a checkpoint "
                               "holding an EMA, the checkpoint's decay is used instead, as the public code does")
    init: str = option("public", "public: the student starts from the checkpoint's raw weights and the EMA continues "
                                 "the checkpoint's own (shadow weights, decay, update count) as in the public trainer; "
                                 "ema: the student starts from the EMA weights and a fresh EMA", choices=("public", "ema"))
    update_every: int = option(10_000, "optimizer steps per round: the teacher is refreshed at each round boundary")
    teacher_from: str = option("student", "what the teacher is refreshed from", choices=("student", "ema"))
    t_grid: int = option(512, "dt = 2^round / t_grid")
    dt_growth: str = option("double", "double (dt = 2^round / t_grid) or linear (the public linear_growth_dt: dt "
                                      "from dt_min to dt_max linearly over the steps)", choices=("double", "linear"))
    dt_min: float = option(0.001, "dt at step 0 with dt_growth=linear")
    dt_max: float = option(0.25, "dt at the last step with dt_growth=linear")
    gamma_min: float = option(-4.0, "gamma at t = 0")
    gamma_max: float = option(-1.0, "gamma at t = 1")
    loss: str = option("kl-bwd", "kl-bwd: KL(student || teacher); kl-fwd: KL(teacher || student)",
                       choices=("kl-bwd", "kl-fwd"))
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    zero_stage: int = option(0, "0: plain PyTorch in one process; 1, 2, 3: DeepSpeed ZeRO stage (torchrun/deepspeed)",
                             choices=(0, 1, 2, 3))
    micro_batch_size: int = option(0, "sequences per rank per forward/backward (0: batch_size / world size)")
    save_every: int = option(0, "steps between resumable checkpoints in OUT/checkpoints (0: at the end and on signals)")
    resume: bool = option(True, "continue the run in OUT from its newest complete checkpoint (a different "
                                "configuration is refused); off: a non-empty OUT is refused")
    overwrite: bool = option(False, "use OUT even if it holds another run: the old folder is moved aside to "
                                    "OUT.old-TIME, never deleted")
    keep_checkpoints: int = option(2, "complete checkpoints kept in OUT/checkpoints (the newest N)")
    log_every: int = option(1, "steps between lines of the JSONL log")
    val_every: int = option(1000, "steps between validations (the public distillation recipe's val_check_interval): "
                                  "NELBO of the EMA (or student) weights, best weights to OUT/best (0: only at the end)")
    val_batches: int = option(8, "validation batches per validation (the public limit_val_batches)")
    val_samples: int = option(0, "samples drawn at each validation for their unigram entropy (and generative "
                                 "perplexity with val_gen_ppl_model); 0: none")
    val_sample_steps: int = option(32, "sampling steps of those samples (the public recipe: 32)")
    val_gen_ppl_model: str = option("", "causal LM (hub name or local folder; the public code uses gpt2-large) that "
                                        "scores the validation samples, public protocol")
    wandb: bool = option(False, "also log to Weights & Biases (project wandb_project) when wandb is installed")
    wandb_project: str = option("duo-fast", "W&B project of --wandb")
    out: str = option("runs/distill", "output folder: log.jsonl, export/, summary.json")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("distill needs --checkpoint (the model to distil)")
        if self.teacher_from not in ("student", "ema") or self.dt_growth not in ("double", "linear"):
            raise ValueError("teacher_from must be student or ema; dt_growth double or linear")
        if self.init not in ("public", "ema"):
            raise ValueError(f"init must be public or ema, got {self.init!r}")
        if not 0 < self.dt_min <= self.dt_max <= 1:
            raise ValueError(f"need 0 < dt_min <= dt_max <= 1, got {self.dt_min}, {self.dt_max}")
        if self.loss not in ("kl-bwd", "kl-fwd"):
            raise ValueError(f"loss must be kl-bwd or kl-fwd, got {self.loss!r}")
        if self.teacher_from == "ema" and self.ema <= 0:
            raise ValueError("teacher_from=ema needs ema > 0")
        if self.batch_size < 1 or self.steps < 1 or self.update_every < 1 or self.t_grid < 1:
            raise ValueError("batch_size, steps, update_every and t_grid must be >= 1")
        if not self.gamma_min < self.gamma_max:
            raise ValueError("gamma_min must be below gamma_max")
        if self.val_every < 0 or self.val_batches < 1 or self.val_samples < 0 or self.val_sample_steps < 1:
            raise ValueError("val_every and val_samples must be >= 0, val_batches and val_sample_steps >= 1")
        if self.val_gen_ppl_model and self.val_samples < 1:
            raise ValueError("--val-gen-ppl-model needs --val-samples >= 1 (the samples it scores)")
        if self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError(f"keep_checkpoints and log_every must be >= 1, got {self.keep_checkpoints}, {self.log_every}")
        if self.zero_stage not in (0, 1, 2, 3) or self.micro_batch_size < 0 or self.save_every < 0:
            raise ValueError("zero_stage must be 0-3; micro_batch_size and save_every >= 0")


DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    "owt": dict(dataset="openwebtext", batch_size=128, steps=50_000, update_every=10_000),
    "demo": dict(dataset="bundled", batch_size=16, steps=60, update_every=20, t_grid=8, warmup_steps=5, lr=1e-4,
                 ema=0.0, out="runs/demo-distill"),
}


def dcd_gap(step: int, cfg: DistillConfig) -> tuple[int, float]:
    """(round, dt) at ``step``: ``2^round / t_grid`` (capped at 1), or with linear growth the
    public ``dt_min + (step / steps)(dt_max - dt_min)``."""
    n = step // cfg.update_every
    if cfg.dt_growth == "linear":
        return n, cfg.dt_min + step / cfg.steps * (cfg.dt_max - cfg.dt_min)
    return n, min(1.0, 2.0 ** n / cfg.t_grid)


class DCDObjective(nn.Module):
    """The student's DCD loss as one module (so that engines and ZeRO-3 see its parameters):
    ``forward(zt, sigma_t, teacher_logits)`` -> mean KL over tokens."""

    def __init__(self, student: DiT, direction: str) -> None:
        super().__init__()
        self.student, self.direction = student, direction

    def forward(self, zt: Tensor, sigma_t: Tensor, teacher_logits: Tensor) -> Tensor:
        return _kl(self.student(zt, sigma_t), teacher_logits, self.direction).mean()


def _kl(student_logits: Tensor, teacher_logits: Tensor, direction: str) -> Tensor:
    """Per-token KL over the vocabulary, float32."""
    ls = student_logits.float().log_softmax(-1)
    lt = teacher_logits.float().log_softmax(-1)
    if direction == "kl-bwd":
        return (ls.exp() * (ls - lt)).sum(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run DCD; writes ``out/log.jsonl``, ``out/checkpoints``, ``out/export`` (HF layout) and
    ``out/summary.json``. Returns the summary on rank 0, ``{}`` on the other ranks."""
    run = _DistillRun(cfg)
    run.loop()
    return run.finish()


class _DistillRun:
    """One ``distill()`` call: run folder, student/teacher/engine, the loop and its log-step reads."""

    def __init__(self, cfg: DistillConfig) -> None:
        from .devices import resolve_device

        self.cfg, self.out = cfg, Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.config = dataclasses.asdict(cfg)
        self.folder = runfolder.plan(self.out, self.config, cfg.resume, cfg.overwrite,
                                     latest_checkpoint(self.ckpt_root) is not None, command="distill")
        self.device, self.rank, self.world, self.micro, self.accum = placement(
            resolve_device(cfg.device), cfg.batch_size, cfg.micro_batch_size, cfg.zero_stage)
        torch.manual_seed(cfg.seed)
        self._load_student()
        self._load_data()
        self._build_engine()
        if self.rank == 0:
            runfolder.apply(self.folder, self.config, command="distill", environment=environment(self.device))
            if self.folder.moved_to is not None:
                print(f"duo-fast distill: the previous contents of {self.out} were moved to {self.folder.moved_to}")
        barrier()
        self.start, self.losses, resumed = 0, [], None
        self.best: dict[str, Any] = {}
        self.validations: list[dict[str, Any]] = []
        if self.folder.action == "resume":
            resumed = self._restore()
        if self.rank == 0:
            engine = f"DeepSpeed ZeRO-{cfg.zero_stage}" if cfg.zero_stage else "PyTorch"
            print(f"duo-fast distill: {self.info.preset} model from {cfg.checkpoint}, K={self.K}, L={self.L}, "
                  f"batch={cfg.batch_size} ({self.world} x {self.micro} x {self.accum}), {engine}, {cfg.steps} steps, "
                  f"rounds of {cfg.update_every}, {cfg.loss}, device={self.device}"
                  + (f"; resumed at step {self.start}" if resumed is not None else ""))
            if self.ema is not None:
                src = ("the checkpoint's EMA" if cfg.init == "public" and self.info.ema_state is not None
                       else "the student's weights")
                print(f"duo-fast distill: student from the {'raw' if cfg.init == 'public' else 'EMA'} weights; EMA from "
                      f"{src}, decay {self.ema_decay}, {self.ema_updates} updates so far")

    def _load_student(self) -> None:
        from .pretrained import load_pretrained

        cfg = self.cfg
        # public init: the raw weights (the EMA is continued separately); init=ema: the EMA weights
        self.student, self.info = load_pretrained(cfg.checkpoint, device=self.device, ema=cfg.init == "ema")
        self.K = self.student.config.vocab_size
        self.L = cfg.length or self.student.config.model_length
        self.tok_name = cfg.tokenizer or self.info.extra.get("tokenizer") or {50257: "gpt2", 50258: "gpt2"}.get(
            self.K, "")
        if not self.tok_name:
            raise ValueError("the checkpoint names no tokenizer: pass --tokenizer")
        self.tok_vocab = self.info.extra.get("tokenizer_vocab", cfg.tokenizer_vocab)

    def _load_data(self) -> None:
        cfg = self.cfg
        tokenizer = get_tokenizer(self.tok_name, self.tok_vocab)
        check_tokenizer_vocab(tokenizer, self.K)
        tok_key = f"{self.tok_name}-{self.tok_vocab}" if self.tok_name == "bundled" else self.tok_name
        if self.rank == 0:
            cached_blocks(cfg.dataset, "train", tokenizer, tok_key, self.L)
            cached_blocks(cfg.dataset, "validation", tokenizer, tok_key, self.L)
        init_distributed(self.device)
        barrier()
        blocks = cached_blocks(cfg.dataset, "train", tokenizer, tok_key, self.L)
        self.tokenizer = tokenizer
        self.val_blocks = cached_blocks(cfg.dataset, "validation", tokenizer, tok_key, self.L)
        self.pad_id = loss_mask_id(cfg.dataset, tokenizer)
        if cfg.val_gen_ppl_model:
            from .evaluate import check_scorer

            check_scorer(cfg.val_gen_ppl_model)
        if blocks.shape[0] < cfg.batch_size:
            raise ValueError(f"only {blocks.shape[0]} blocks of length {self.L} for a batch of {cfg.batch_size}")
        order = BlockOrder(blocks.shape[0], self.micro, seed=cfg.seed + 3, rank=self.rank, world=self.world)
        self.feeder = BatchFeeder(blocks, order, self.device)

    def _build_engine(self) -> None:
        cfg = self.cfg
        self.student.train()
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.teacher.autocast = False             # the teacher's targets in float32 (section 6), not bf16 autocast
        self.objective = DCDObjective(self.student, cfg.loss)
        args = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=cfg.grad_clip,
                    lr_lambda=lr_multiplier("constant", cfg.lr, cfg.warmup_steps, cfg.steps))
        if cfg.zero_stage:
            self.engine = DeepSpeedEngine(self.objective, cfg.zero_stage, self.micro, self.accum, self.world,
                                          device=self.device, **args)
            self.forward = self.engine.engine
        else:
            self.engine = TorchEngine(self.objective, accum=self.accum, **args)
            self.forward = self.objective
        self.ema_decay, self.ema_updates = cfg.ema, 0
        with self.engine.gathered():
            self.ema = [p.detach().float().clone() for p in self.student.parameters()] if cfg.ema > 0 else None
            state = self.info.ema_state
            if self.ema is not None and cfg.init == "public" and state is not None:
                self.ema_decay, self.ema_updates = continue_ema(self.ema, self.student, state, cfg.ema)
        self.table = TTable.build(self.K, min(-5.0, cfg.gamma_min), max(-1.0, cfg.gamma_max))
        self.gens = {"gen": torch.Generator(device=self.device).manual_seed(cfg.seed + 1)}   # reseeded per micro-batch

    def _read(self, path: Path) -> dict[str, Any]:
        shared, mine = read_checkpoint(path, self.engine, self.rank)
        if shared["world"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {shared['world']} processes, this run has {self.world}")
        self.teacher.load_state_dict(shared["teacher"])
        set_generator_states(self.gens, mine["rng"], self.device)
        self.feeder.load_state_dict(mine["order"])
        return shared

    def _restore(self) -> Path:
        loaded = load_newest(self.ckpt_root, self._read, self.rank)
        if loaded is None:
            raise ValueError(f"--out {self.out}: no complete checkpoint could be read")
        resumed, shared = loaded
        self.ema = None if shared["ema"] is None else [e.to(self.device) for e in shared["ema"]]
        self.ema_decay = shared.get("ema_decay", self.cfg.ema)
        self.best, self.validations = shared.get("best", {}), shared.get("validations", [])
        self.ema_updates = shared.get("ema_updates", shared["step"] + 1)
        self.start, self.losses = shared["step"] + 1, shared["losses"]
        if self.rank == 0:
            runfolder.note_resume(self.folder, shared["step"], resumed, "distill")
        return resumed

    def checkpoint(self, step: int) -> Path:
        shared = {"step": step, "teacher": self.teacher.state_dict(), "ema": self.ema, "ema_decay": self.ema_decay,
                  "ema_updates": self.ema_updates, "losses": self.losses, "best": self.best,
                  "validations": self.validations,
                  "world": self.world, "config": self.config}
        mine = {"rng": generator_states(self.gens, self.device), "order": self.feeder.state_dict()}
        return write_checkpoint(self.ckpt_root, step, self.engine, self.rank, shared, mine,
                                keep=self.cfg.keep_checkpoints)

    def step(self, step: int, dt: float) -> Tensor:
        """One optimizer update with no host read; returns this rank's mean loss (device)."""
        cfg, span = self.cfg, self.cfg.gamma_max - self.cfg.gamma_min
        if step > 0 and step % cfg.update_every == 0:   # a new round: the teacher takes the student's (or EMA) weights
            with torch.no_grad(), self.engine.gathered():
                src = self.ema if cfg.teacher_from == "ema" else [p.detach() for p in self.student.parameters()]
                torch._foreach_copy_(list(self.teacher.parameters()), src)
        self.objective.train()
        losses = []
        for j in range(self.accum):
            slot = j * self.world + self.rank
            self.gens["gen"].manual_seed(micro_seed(cfg.seed, step, slot, 1))
            torch.manual_seed(micro_seed(cfg.seed, step, slot, 2))
            x0, _ = self.feeder.next()
            t = ref.stratified_times(self.micro, generator=self.gens["gen"], device=self.device, dtype=torch.float64,
                                     strata=cfg.batch_size, first=(self.rank * self.accum + j) * self.micro)
            t = (t + dt).clamp(0.0, 1.0)
            s = t - dt
            gamma_t, gamma_s = cfg.gamma_min + t * span, cfg.gamma_min + s * span
            alpha_t, alpha_s = self.table.alpha_and_derivative(gamma_t)[0], self.table.alpha_and_derivative(gamma_s)[0]
            zt, zs = coupled_latents(x0, gamma_t, gamma_s, self.K, seed=micro_seed(cfg.seed, step, slot, 3))
            with torch.no_grad():
                teacher_logits = self.teacher(zs, (-torch.log(alpha_s)).float())
            loss = self.forward(zt, (-torch.log(alpha_t)).float(), teacher_logits)
            self.engine.backward(loss)
            self.engine.step(~torch.isfinite(loss.detach()))
            losses.append(loss.detach())
        if self.ema is not None:
            self.ema_updates += 1
            with torch.no_grad(), self.engine.gathered():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.student.parameters()],
                                     1 - ema_decay(self.ema_decay, self.ema_updates))
        return torch.stack(losses).mean()

    def _eval_model(self) -> DiT:
        """A copy of the weights validation and samples use: the EMA, else the student (gathered
        under ZeRO-3: a collective)."""
        with self.engine.gathered():
            model = copy.deepcopy(self.student).eval()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(model.parameters()), self.ema)
        return model

    def _validate_now(self, step: int) -> float:
        """NELBO of the EMA (or student) weights on ``val_batches`` fixed validation batches, optional
        samples' entropy and generative perplexity, best weights to OUT/best; one log record."""
        from .evaluate import sample_metrics, validation_nelbo
        from .resume import mean_over_ranks

        cfg = self.cfg
        model = self._eval_model()
        value = mean_over_ranks(validation_nelbo(model, self.val_blocks, self.micro, cfg.val_batches, self.rank,
                                                 self.world, cfg.seed, self.device, self.pad_id), self.device)
        rec: dict[str, Any] = {"step": step, "val_nelbo": value, "val_ppl_bound": math.exp(min(value, 50.0))}
        if cfg.val_samples > 0 and self.rank == 0:
            rec.update(sample_metrics(model, self.tokenizer, cfg.val_samples, cfg.val_sample_steps, self.L,
                                      cfg.seed + step, self.device, cfg.val_gen_ppl_model))
        if math.isfinite(value) and value < self.best.get("val_nelbo", math.inf):
            self.best = {"step": step, "val_nelbo": value}
            rec["best"] = True
            if self.rank == 0:
                save_hf_folder(model, self.out / "best", extra={**self._export_extra(), "step": step})
        self.validations.append(rec)
        if self.rank == 0:
            if self.log is not None:
                self.log.write(json.dumps(rec) + "\n")
                self.log.flush()
            if self.wandb is not None:
                self.wandb.log({f"val/{k}": v for k, v in rec.items() if k not in ("step", "best")}, step=step)
            if cfg.progress and not self.show_bar:
                print(f"step {step}/{cfg.steps} validation NELBO {value:.4f}" + (" (best)" if rec.get("best") else ""),
                      flush=True)
        return value

    def _export_extra(self) -> dict[str, Any]:
        return {"tokenizer": self.tok_name, "tokenizer_vocab": self.tok_vocab, "distilled_from": self.cfg.checkpoint,
                "steps": self.cfg.steps, "weights": "ema" if self.ema is not None else "raw"}

    def loop(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.log = open(self.out / "log.jsonl", "a") if self.rank == 0 else None
        self.wandb = open_wandb("distill", cfg.wandb and self.rank == 0, cfg.wandb_project, self.out, self.config)
        stop = StopFlag()
        self.t_start = time.perf_counter()
        self.show_bar = cfg.progress and self.rank == 0 and sys.stderr.isatty()
        self.bar = tqdm(range(self.start, cfg.steps), disable=not self.show_bar, desc="distill", dynamic_ncols=True,
                        initial=self.start, total=cfg.steps)
        self.meter = IntervalMeter(self.device)
        try:
            for step in self.bar:
                rnd, dt = dcd_gap(step, cfg)
                mean = self.step(step, dt)
                self.meter.add(step, mean, ~torch.isfinite(mean))
                stopping = agreed_stop(stop.after_step(step))
                saving = cfg.save_every > 0 and (step + 1) % cfg.save_every == 0
                refreshed = step > 0 and step % cfg.update_every == 0
                logging = step % cfg.log_every == 0 or step == cfg.steps - 1 or refreshed
                validating = cfg.val_every > 0 and (step + 1) % cfg.val_every == 0 and step + 1 < cfg.steps
                if logging or stopping or saving or validating:           # the only host reads of the loop
                    self._read_interval(step, rnd, dt, refreshed, logging)
                if validating:
                    self._validate_now(step)
                if stopping or saving:
                    path = self.checkpoint(step)
                    if stopping:
                        exit_after_checkpoint("distill", stop.signum, step, path, self.rank == 0)
        finally:
            stop.restore()
            if self.log is not None:
                self.log.close()
                self.log = None

    def _read_interval(self, step: int, rnd: int, dt: float, refreshed: bool, logging: bool) -> None:
        read = self.meter.read()
        self.losses.extend(v for v in read["losses"] if math.isfinite(v))
        if read["skipped"] and len(read["skipped"]) == len(read["steps"]):
            raise FloatingPointError(f"the distillation loss was not finite at every step from "
                                     f"{read['steps'][0]} to {read['steps'][-1]}; no update was applied")
        if read["skipped"] and self.rank == 0:
            print(f"duo-fast distill: non-finite loss at steps {read['skipped']}: those updates were skipped")
        value = read["losses"][-1]
        if self.show_bar:
            self.bar.set_postfix(loss=f"{value:.4f}", dt=f"{dt:.4f}")
        if self.log is not None and logging:
            rec = {"step": step, "loss": value, "round": rnd, "dt": dt, "teacher_refreshed": refreshed,
                   "lr": self.engine.lr(), "grad_norm": self.engine.grad_norm(), "skipped_steps": read["skipped"]}
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
            if self.wandb is not None:
                self.wandb.log({f"distill/{k}": rec[k] for k in ("loss", "dt", "lr", "grad_norm")}, step=step)
            if not self.show_bar and self.cfg.progress:
                print(f"step {step}/{self.cfg.steps} loss {value:.4f} dt {dt:.4f}", flush=True)

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        seconds = time.perf_counter() - self.t_start
        if self.rank == 0:
            self.log = open(self.out / "log.jsonl", "a")
        val_end = self._validate_now(cfg.steps - 1)
        if self.log is not None:
            self.log.close()
        if self.wandb is not None:
            self.wandb.finish()
        if latest_checkpoint(self.ckpt_root) != self.ckpt_root / f"step{cfg.steps - 1:09d}":
            self.checkpoint(cfg.steps - 1)
        extra = self._export_extra()
        with self.engine.gathered():
            if self.rank != 0:
                return {}
            final = copy.deepcopy(self.student).eval()
            if self.ema is not None:
                with torch.no_grad():
                    torch._foreach_copy_(list(final.parameters()), self.ema)
            export = save_hf_folder(final, self.out / "export", extra=extra)
        losses, n = self.losses, max(1, min(10, len(self.losses) // 4))
        summary = {"loss_first": sum(losses[:n]) / n, "loss_last": sum(losses[-n:]) / n,
                   "rounds": dcd_gap(cfg.steps - 1, cfg)[0] + 1, "world_size": self.world,
                   "zero_stage": cfg.zero_stage,
                   "tokens_per_s": (cfg.steps - self.start) * cfg.batch_size * self.L / max(seconds, 1e-9),
                   "val_nelbo_end": val_end, "best": self.best, "validations": self.validations,
                   "export": str(export), "config": self.config, "status": "finished",
                   "environment": environment(self.device)}
        runfolder.write_json_atomic(self.out / "summary.json", summary)
        print(f"distillation loss ({cfg.loss}): start {summary['loss_first']:.4f} -> end {summary['loss_last']:.4f} "
              f"over {summary['rounds']} rounds; {summary['tokens_per_s']:,.0f} tokens/s")
        print(f"exported {'EMA' if self.ema is not None else 'raw'} weights to {export}")
        return summary
