"""The one training harness: everything ``duo-fast train`` and ``duo-fast distill`` share.

A run is a :class:`Session` (this rank's state: placement, tokenizer and blocks, the model, its
engine, the EMA, the noise generators, resumable checkpoints, validation and export) driven by
:func:`run_session` (the run folder, the step loop with its log-step reads, signals, validation,
the final checkpoint, export and ``summary.json``). An objective (``training.duo``: the Duo
curriculum and discrete loss; ``training.dcd``: consistency distillation) subclasses
:class:`Session` and fills in only what is its own: the model it starts from, the module its
engine optimises, one optimizer step, its log fields and its summary.

The step loop reads from the device only at log, save, validation and stop points (one read
and one collective per interval, :class:`IntervalMeter`); a signal is agreed over ranks at every
step boundary and answered with a checkpoint (docs/training.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from duo_fast.core.devices import resolve_device
from duo_fast.data import get_tokenizer, loss_mask_id
from duo_fast.data.blocks import BlockOrder, cached_blocks
from duo_fast.environment import environment
from duo_fast.eval.gen_ppl import check_scorer, sample_metrics
from duo_fast.eval.nelbo import validation_nelbo
from duo_fast.io.hf_folder import save_hf_folder
from duo_fast.model import DiT
from duo_fast.training import run_folder
from duo_fast.training.checkpoints import (
    StopFlag,
    generator_states,
    latest_checkpoint,
    load_newest,
    mean_over_ranks,
    read_checkpoint,
    read_plain,
    set_generator_states,
    write_checkpoint,
)
from duo_fast.training.engine import DeepSpeedEngine, TorchEngine, barrier, init_distributed, placement
from duo_fast.training.loop_support import (
    BatchFeeder,
    IntervalMeter,
    agreed_stop,
    continue_ema,
    ema_decay,
    exit_after_checkpoint,
    open_wandb,
)

__all__ = ["Session", "StepPlan", "run_session", "device_sync"]


def device_sync(device: torch.device) -> None:
    """Wait for the device: only where the loop reads values anyway (log steps, timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepPlan:
    """What the loop does around one step: ``logging`` (a log line), ``check`` (the checked mode
    of the loss), and the objective's own values for its log record (``info``)."""

    logging: bool
    check: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Session:
    """One rank's state of a run. Subclasses set :attr:`command` and implement the hooks below
    the line; everything else is shared."""

    command = "train"
    order_seed = 2                  # the data order's seed is ``cfg.seed + order_seed``

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.device, self.rank, self.world, self.micro, self.accum = placement(
            resolve_device(cfg.device), cfg.batch_size, cfg.micro_batch_size, cfg.zero_stage)
        torch.manual_seed(cfg.seed)
        self.load_source()
        self._load_data()
        self.model = self.build_model()
        self.pad_id = loss_mask_id(cfg.dataset, self.tokenizer)
        if cfg.val_gen_ppl_model:
            check_scorer(cfg.val_gen_ppl_model)
        self._build_engine()
        self.finish_setup()

    # -- shared setup -----------------------------------------------------------------------

    def _load_data(self) -> None:
        """The tokenizer, then the cached blocks: rank 0 tokenises and caches, the others map the cache."""
        cfg = self.cfg
        self.tokenizer = get_tokenizer(self.tokenizer_name, self.tokenizer_vocab)
        self.check_tokenizer()
        key = f"{self.tokenizer_name}-{self.tokenizer_vocab}" if self.tokenizer_name == "bundled" else self.tokenizer_name
        vf, L = cfg.val_fraction, self.length
        if self.rank == 0:
            cached_blocks(cfg.dataset, "train", self.tokenizer, key, L, val_fraction=vf)
            cached_blocks(cfg.dataset, "validation", self.tokenizer, key, L, val_fraction=vf)
        init_distributed(self.device)
        barrier()
        self.train_blocks = cached_blocks(cfg.dataset, "train", self.tokenizer, key, L, val_fraction=vf)
        self.val_blocks = cached_blocks(cfg.dataset, "validation", self.tokenizer, key, L, val_fraction=vf)
        if self.train_blocks.shape[0] < cfg.batch_size:
            raise ValueError(self.too_few_blocks_message())
        self.order = BlockOrder(self.train_blocks.shape[0], self.micro, seed=cfg.seed + self.order_seed,
                                rank=self.rank, world=self.world)
        self.feeder = BatchFeeder(self.train_blocks, self.order, self.device)

    def _build_engine(self) -> None:
        """The engine around :meth:`objective_module`, then the EMA of the model's weights."""
        cfg = self.cfg
        self.objective = self.objective_module()
        args = self.optimizer_args()
        if cfg.zero_stage:
            if cfg.zero_stage == 3 and hasattr(self.objective, "register_external_parameters"):
                self.objective.register_external_parameters()
            self.engine = DeepSpeedEngine(self.objective, cfg.zero_stage, self.micro, self.accum, self.world,
                                          device=self.device, **args)
            self._forward = self.engine.engine
        else:
            self.engine = TorchEngine(self.objective, accum=self.accum, **args)
            self._forward = self.objective
        self.ema_updates, self.ema_decay = 0, cfg.ema
        with self.engine.gathered():
            self.ema = [p.detach().float().clone() for p in self.model.parameters()] if cfg.ema > 0 else None
            state = self.source_ema_state()
            if self.ema is not None and state is not None:      # the checkpoint's EMA, decay and count continue
                self.ema_decay, self.ema_updates = continue_ema(self.ema, self.model, state, cfg.ema)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def update_ema(self) -> None:
        """The public EMA: decay ``min(ema, (1 + n)/(10 + n))`` at its ``n``-th update (a host count)."""
        if self.ema is None:
            return
        self.ema_updates += 1
        with torch.no_grad(), self.engine.gathered():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()],
                                 1 - ema_decay(self.ema_decay, self.ema_updates))

    def eval_model(self, use_ema: bool = True) -> DiT:
        """A fresh copy of the weights that validation, samples and exports use: the EMA (when
        kept and ``use_ema``), else the model's own (gathered under ZeRO-3: a collective, so every
        rank calls it). A new module, never a deep copy of an engine-managed one."""
        model = DiT(self.model.config).to(self.device).eval()
        with torch.no_grad(), self.engine.gathered():
            src = self.ema if use_ema and self.ema is not None else [p.detach() for p in self.model.parameters()]
            torch._foreach_copy_(list(model.parameters()), src)
        return model

    @torch.no_grad()
    def nelbo(self, model: DiT) -> float:
        """Discrete NELBO (nats/token) of ``model`` on ``val_batches`` fixed validation batches, the
        same noise at every call (``eval.nelbo.validation_nelbo``), averaged over ranks."""
        value = validation_nelbo(model, self.val_blocks, self.micro, self.cfg.val_batches, self.rank, self.world,
                                 self.cfg.seed, self.device, self.pad_id)
        return mean_over_ranks(value, self.device)

    def validate(self, use_ema: bool = True) -> float:
        """:meth:`nelbo` of the EMA (``use_ema``, when kept) or the raw weights."""
        return self.nelbo(self.eval_model(use_ema))

    def sample_metrics(self, step: int, model: DiT | None = None) -> dict[str, Any]:
        """``val_samples`` samples of the EMA (or raw) weights: their unigram entropy and, with
        ``val_gen_ppl_model``, their generative perplexity (public protocol). Rank 0 samples;
        the other ranks return {}."""
        cfg = self.cfg
        model = self.eval_model() if model is None else model
        if self.rank != 0:
            return {}
        return sample_metrics(model, self.tokenizer, cfg.val_samples, cfg.val_sample_steps, self.length,
                              cfg.seed + step, self.device, cfg.val_gen_ppl_model)

    def export(self, path: str | Path, step: int, model: DiT | None = None) -> Path | None:
        """The EMA (or raw) weights in the public HF layout, written by rank 0 (a collective)."""
        model = self.eval_model() if model is None else model
        if self.rank != 0:
            return None
        extra = {**self.export_extra(), "step": step, "weights": "ema" if self.ema is not None else "raw"}
        return save_hf_folder(model, path, extra=extra)

    # -- resumable checkpoints ---------------------------------------------------------------

    def generators(self) -> dict[str, torch.Generator]:
        return {"gen": self.gen}

    def save_checkpoint(self, root: Path, step: int, metrics: dict[str, Any]) -> Path:
        """A resumable checkpoint after ``step`` (a collective; see ``training.checkpoints``)."""
        shared = {"step": step, "ema": self.ema, "ema_updates": self.ema_updates, "ema_decay": self.ema_decay,
                  "world": self.world, "vocab_size": self.vocab_size, "config": dataclasses.asdict(self.cfg),
                  **self.checkpoint_state(metrics)}
        mine = {"rng": generator_states(self.generators(), self.device), "order": self.feeder.state_dict()}
        return write_checkpoint(root, step, self.engine, self.rank, shared, mine, keep=self.cfg.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore everything ``save_checkpoint`` wrote; returns the shared state. Nothing in
        ``path`` can run code (``training.checkpoints``)."""
        shared = read_plain(path / "state.pt")
        if shared["world"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {shared['world']} processes, this run has {self.world}")
        if shared.get("vocab_size", self.vocab_size) != self.vocab_size:
            raise ValueError(f"checkpoint {path} has a vocabulary of {shared['vocab_size']}, but the tokenizer "
                             f"{self.tokenizer_name!r} gives {self.vocab_size}: they do not belong together")
        shared, mine = read_checkpoint(path, self.engine, self.rank)
        set_generator_states(self.generators(), mine["rng"], self.device)
        self.feeder.load_state_dict(mine["order"])
        if self.ema is not None and shared["ema"] is not None:
            self.ema = [e.to(self.device) for e in shared["ema"]]
        self.ema_updates = shared.get("ema_updates", shared["step"] + 1)
        self.ema_decay = shared.get("ema_decay", self.cfg.ema)
        self.restore_state(shared)
        return shared

    # -- hooks: what an objective implements ---------------------------------------------------

    tokenizer_name: str
    tokenizer_vocab: int
    length: int
    gen: torch.Generator

    def load_source(self) -> None:
        """Before the data: what the run starts from (sets ``tokenizer_name``, ``tokenizer_vocab``, ``length``)."""
        raise NotImplementedError

    def check_tokenizer(self) -> None:
        """After the tokenizer is loaded: raise ValueError if it does not fit the run."""

    def too_few_blocks_message(self) -> str:
        return f"only {self.train_blocks.shape[0]} training blocks for a batch of {self.cfg.batch_size}"

    def build_model(self) -> DiT:
        """The denoiser this run trains, on ``self.device``."""
        raise NotImplementedError

    def objective_module(self) -> nn.Module:
        """The module the engine optimises (its forward is the loss of one micro-batch)."""
        raise NotImplementedError

    def optimizer_args(self) -> dict[str, Any]:
        """``lr``, ``betas``, ``weight_decay``, ``lr_lambda``, ``grad_clip`` of the engine."""
        raise NotImplementedError

    def source_ema_state(self) -> dict[str, Any] | None:
        """An EMA to continue (``PretrainedInfo.ema_state``), or None for a fresh one."""
        return None

    def finish_setup(self) -> None:
        """The rest of the objective's state (tables, teacher, generators)."""

    def plan_step(self, step: int) -> StepPlan:
        raise NotImplementedError

    def train_step(self, step: int, check: bool = False) -> tuple[Tensor, Tensor, list[int]]:
        """One optimizer update from this rank's micro-batches, with no host read: (mean loss
        0-d device tensor, skipped 0-d device bool, crc32 checksums of the micro-batches)."""
        raise NotImplementedError

    def new_metrics(self) -> dict[str, Any]:
        """The run's accumulated metrics (kept in checkpoints): at least ``best`` and ``validations``."""
        return {"best": {}, "validations": []}

    def checkpoint_state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The objective's part of a checkpoint's shared state."""
        return {}

    def restore_state(self, shared: dict[str, Any]) -> None:
        """Restore the objective's part of a checkpoint (after the common parts)."""

    def metrics_from(self, shared: dict[str, Any]) -> dict[str, Any]:
        return shared["metrics"]

    def export_extra(self) -> dict[str, Any]:
        raise NotImplementedError

    # what the loop prints and logs
    scalar_prefix = "train"
    scalar_keys: tuple[str, ...] = ("loss",)
    validations_key = "validations"

    def announce(self, resumed: Path | None, start: int) -> None:
        """The run's first line (rank 0)."""

    def on_start(self, metrics: dict[str, Any]) -> None:
        """Before the first step (every rank)."""

    def account(self, metrics: dict[str, Any], plan: StepPlan, read: dict[str, Any], finite: list[float],
                seconds: float) -> None:
        """Add an interval's losses (``finite``: the finite ones), its time and tokens to ``metrics``."""

    def all_skipped_message(self, read: dict[str, Any]) -> str:
        return (f"the loss was not finite at every step from {read['steps'][0]} to {read['steps'][-1]}; no update "
                f"was applied in that interval")

    def postfix(self, plan: StepPlan, loss: float) -> dict[str, str]:
        return {"loss": f"{loss:.4f}"}

    def log_fields(self, step: int, plan: StepPlan, read: dict[str, Any], sums: list[list[int]], seconds: float,
                   finite: list[float]) -> dict[str, Any]:
        """The log record of a log step after ``step`` and ``loss`` (called on every rank: it may
        hold a collective)."""
        return {}

    def console_line(self, step: int, plan: StepPlan, loss: float, rec: dict[str, Any]) -> str:
        return f"step {step}/{self.cfg.steps} loss {loss:.4f}"

    def after_interval(self, metrics: dict[str, Any], step: int, plan: StepPlan) -> None:
        """After an interval's reads (every rank): e.g. a validation at a phase boundary."""

    def summary(self, metrics: dict[str, Any], val_end: float, seconds: float, start: int) -> dict[str, Any]:
        """The objective's fields of ``summary.json``."""
        raise NotImplementedError

    def print_summary(self, summary: dict[str, Any], metrics: dict[str, Any]) -> None:
        """The closing lines (rank 0)."""


def run_session(session_cls: type[Session], cfg: Any) -> dict[str, Any]:
    """Run ``cfg`` with ``session_cls``; writes ``out/log.jsonl``, ``out/checkpoints``, ``out/export``
    (and ``out/best``) and ``out/summary.json`` (docs/training.md). Returns the summary on rank 0,
    ``{}`` on the other ranks."""
    run = _Run(session_cls, cfg)
    run.loop()
    return run.finish()


class _Run:
    """One run: the run folder, the session, the loop and its log-step reads."""

    def __init__(self, session_cls: type[Session], cfg: Any) -> None:
        self.cfg, self.out = cfg, Path(cfg.out)
        self.command = session_cls.command
        self.ckpt_root = self.out / "checkpoints"
        self.config = dataclasses.asdict(cfg)
        # what may be done with --out is decided before any heavy work, and nothing is written yet
        self.folder = run_folder.plan(self.out, self.config, cfg.resume, cfg.overwrite,
                                      latest_checkpoint(self.ckpt_root) is not None, command=self.command)
        self.s = s = session_cls(cfg)
        self.rank0 = s.rank == 0
        if self.rank0:
            run_folder.apply(self.folder, self.config, command=self.command, environment=environment(s.device))
            if self.folder.moved_to is not None:
                print(f"duo-fast {self.command}: the previous contents of {self.out} were moved to "
                      f"{self.folder.moved_to}")
        barrier()
        self.start, self.metrics, resumed = 0, s.new_metrics(), None
        if self.folder.action == "resume":
            resumed = self._restore()
        self.log = None
        if self.rank0:
            s.announce(resumed, self.start)
        s.on_start(self.metrics)

    def _restore(self) -> Path:
        loaded = load_newest(self.ckpt_root, self.s.load_checkpoint, self.s.rank)
        if loaded is None:
            raise ValueError(f"--out {self.out}: no complete checkpoint could be read")
        resumed, shared = loaded
        self.start, self.metrics = shared["step"] + 1, self.s.metrics_from(shared)
        if self.rank0:
            run_folder.note_resume(self.folder, shared["step"], resumed, self.command)
        return resumed

    def _open_logs(self) -> None:
        cfg = self.cfg
        self.log = open(self.out / "log.jsonl", "a") if self.rank0 else None
        self.tb = None
        if getattr(cfg, "tensorboard", False) and self.rank0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:
                print(f"duo-fast {self.command}: tensorboard is not installed; logging to log.jsonl only")
        self.wandb = open_wandb(self.command, cfg.wandb and self.rank0, cfg.wandb_project, self.out, self.config)

    def _write(self, rec: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()

    def loop(self) -> None:
        """The steps; host reads only at log, save, validation and stop points (``_read_interval``)."""
        from tqdm.auto import tqdm

        cfg, s = self.cfg, self.s
        self._open_logs()
        stop = StopFlag()
        self.show_bar = cfg.progress and self.rank0 and sys.stderr.isatty()
        self.bar = tqdm(range(self.start, cfg.steps), disable=not self.show_bar, desc=self.command, dynamic_ncols=True,
                        initial=self.start, total=cfg.steps)
        self.meter, self.sums = IntervalMeter(s.device), []
        device_sync(s.device)
        self.t_start = self.t_interval = time.perf_counter()
        try:
            for step in self.bar:
                plan = s.plan_step(step)
                loss, bad, sums = s.train_step(step, check=plan.check)
                self.meter.add(step, loss, bad)
                self.sums.append(sums)
                stopping = agreed_stop(stop.after_step(step))
                saving = cfg.save_every > 0 and (step + 1) % cfg.save_every == 0
                validating = cfg.val_every > 0 and (step + 1) % cfg.val_every == 0 and step + 1 < cfg.steps
                if plan.logging or stopping or saving or validating:
                    self._read_interval(step, plan)
                if validating:
                    self._validate_now(step)
                if stopping or saving:
                    path = s.save_checkpoint(self.ckpt_root, step, self.metrics)
                    if stopping:
                        exit_after_checkpoint(self.command, stop.signum, step, path, self.rank0)
                    self.t_interval = time.perf_counter()
        finally:
            stop.restore()
            if self.log is not None:
                self.log.close()
                self.log = None

    def _read_interval(self, step: int, plan: StepPlan) -> None:
        """The interval's one device read and one collective; the log line."""
        cfg, s = self.cfg, self.s
        device_sync(s.device)
        dt = time.perf_counter() - self.t_interval
        read = self.meter.read()
        finite = [v for v in read["losses"] if math.isfinite(v)]
        s.account(self.metrics, plan, read, finite, dt)
        if read["skipped"] and len(read["skipped"]) == len(read["steps"]):
            raise FloatingPointError(s.all_skipped_message(read))
        if read["skipped"] and self.rank0:
            print(f"duo-fast {self.command}: non-finite loss at steps {read['skipped']}: those updates were skipped")
        loss_now = read["losses"][-1]
        if self.show_bar:
            self.bar.set_postfix(**s.postfix(plan, loss_now))
        fields = s.log_fields(step, plan, read, self.sums, dt, finite) if plan.logging else None   # every rank or none
        self.sums = []
        if self.rank0 and plan.logging:
            rec = {"step": step, "loss": loss_now, **fields}
            self._write(rec)
            if not self.show_bar and cfg.progress:
                print(s.console_line(step, plan, loss_now, rec), flush=True)
            self._scalars({f"{s.scalar_prefix}/{k}": rec[k] for k in s.scalar_keys}, step)
        s.after_interval(self.metrics, step, plan)
        self.t_interval = time.perf_counter()

    def _validate_now(self, step: int) -> float:
        """Validation (every ``val_every`` steps, and at the end): the NELBO of the EMA weights,
        optional samples' entropy and generative perplexity, the best weights exported to
        OUT/best; one log record (JSONL, TensorBoard, W&B)."""
        cfg, s, metrics = self.cfg, self.s, self.metrics
        model = s.eval_model()
        value = s.nelbo(model)
        rec: dict[str, Any] = {"step": step, "val_nelbo": value, "val_ppl_bound": math.exp(min(value, 50.0))}
        if cfg.val_samples > 0:
            rec.update(s.sample_metrics(step, model))
        best = metrics.get("best") or {}
        if math.isfinite(value) and value < best.get("val_nelbo", math.inf):
            metrics["best"] = {"step": step, "val_nelbo": value}
            s.export(self.out / "best", step, model)
            rec["best"] = True
        metrics.setdefault(s.validations_key, []).append(rec)
        if self.rank0:
            self._write(rec)
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
        """Final validation, checkpoint, export and ``summary.json``."""
        cfg, s, metrics = self.cfg, self.s, self.metrics
        seconds = time.perf_counter() - self.t_start
        if self.rank0:
            self.log = open(self.out / "log.jsonl", "a")
        val_end = self._validate_now(cfg.steps - 1)             # before the checkpoint: it holds the best so far
        if self.log is not None:
            self.log.close()
            self.log = None
        if latest_checkpoint(self.ckpt_root) != self.ckpt_root / f"step{cfg.steps - 1:09d}":
            s.save_checkpoint(self.ckpt_root, cfg.steps - 1, metrics)        # the finished run can be extended
        export = s.export(self.out / "export", cfg.steps)
        if self.wandb is not None:
            self.wandb.finish()
        if not self.rank0:
            return {}
        summary = {**s.summary(metrics, val_end, seconds, self.start), "best": metrics.get("best"),
                   "validations": metrics.get(s.validations_key, []), "world_size": s.world,
                   "zero_stage": cfg.zero_stage, "export": str(export), "config": self.config, "status": "finished",
                   "environment": environment(s.device)}
        run_folder.write_json_atomic(self.out / "summary.json", summary)
        s.print_summary(summary, metrics)
        return summary
