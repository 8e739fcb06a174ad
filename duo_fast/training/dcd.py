"""Discrete Consistency Distillation (docs/math.md section 6), an objective of the training harness
(``training.harness``: one process or DeepSpeed ZeRO 1-3, the same resumable checkpoints with the
teacher, the round and the EMA, and the same signal handling as ``duo-fast train``).

The student starts from a trained Duo model; the teacher is a frozen copy refreshed every
``update_every`` optimizer steps (from the student, or from its EMA). In round
``n = step // update_every`` the step gap is ``dt = 2^n / t_grid``, capped at 1 (or, with linear
growth, ``dt_min + (step / steps)(dt_max - dt_min)``). Each step: stratified ``t``, ``t <- clip(t + dt, 0, 1)``,
``s = t - dt``; ``gamma`` linear in time on ``[gamma_min, gamma_max]``; ``alpha = T(gamma)``;
``(z_t, z_s)`` from one shared Gaussian noise by ``ops.coupled_latents`` (O(1) per token, exact);
the student's log-probabilities at ``(z_t, -log alpha_t)`` (with gradient) against the teacher's
at ``(z_s, -log alpha_s)`` (no gradient, float32); loss ``KL(student || teacher)`` (``kl-bwd``) or
``KL(teacher || student)`` (``kl-fwd``) summed over the vocabulary, mean over tokens.

The teacher is a full copy on every rank (it only runs forward), refreshed from the gathered
student under ZeRO-3.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from duo_fast.core.draws import stratified_times
from duo_fast.core.options import option
from duo_fast.core.seeds import micro_seed
from duo_fast.data import check_tokenizer_vocab, tokenizer_for_vocab
from duo_fast.model import DiT
from duo_fast.ops import coupled_latents
from duo_fast.ops.ttable import TTable
from duo_fast.training.config import RunConfig, recipe
from duo_fast.training.harness import Session, StepPlan, run_session
from duo_fast.training.lr_schedule import lr_multiplier

__all__ = ["DistillConfig", "distill", "dcd_gap", "DISTILL_PRESETS", "Distiller", "DCDObjective", "kl_divergence"]


@dataclass
class DistillConfig(RunConfig):
    """Every option of ``duo-fast distill``: the harness's (:class:`RunConfig`, with the public DCD
    recipe's defaults) and DCD's own (section 6)."""

    dataset: str = recipe("dataset", "openwebtext")
    tokenizer: str = recipe("tokenizer", "", "tokenizer (default: the checkpoint's, from its config.json)")
    length: int = recipe("length", 0, "sequence length (0: the model's)")
    batch_size: int = recipe("batch_size", 128)
    steps: int = recipe("steps", 50_000)
    lr: float = recipe("lr", 6e-5)
    warmup_steps: int = recipe("warmup_steps", 500, "linear warm-up steps (the first update has learning rate 0, as "
                                                    "in the public trainer), then constant")
    ema: float = recipe("ema", 0.999, "EMA decay of the exported weights (0 disables); with init=public and a "
                                      "checkpoint holding an EMA, the checkpoint's decay is used instead, as the "
                                      "public code does")
    log_every: int = recipe("log_every", 1)
    val_every: int = recipe("val_every", 1000, "steps between validations (the public distillation recipe's "
                                               "val_check_interval): NELBO of the EMA (or student) weights, best "
                                               "weights to OUT/best (0: only at the end)")
    val_batches: int = recipe("val_batches", 8, "validation batches per validation (the public limit_val_batches)")
    val_sample_steps: int = recipe("val_sample_steps", 32, "sampling steps of those samples (the public recipe: 32)")
    out: str = recipe("out", "runs/distill")
    checkpoint: str = option("", "the model to distil: a duo-fast train export, a HF folder, a hub id or a .ckpt")
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

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("distill needs --checkpoint (the model to distil)")
        super().__post_init__()
        if self.length < 0:
            raise ValueError(f"--length must be >= 0 (0: the model's), got {self.length}")
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
        if self.update_every < 1 or self.t_grid < 1:
            raise ValueError("update_every and t_grid must be >= 1")
        if not self.gamma_min < self.gamma_max:
            raise ValueError("gamma_min must be below gamma_max")


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
        return kl_divergence(self.student(zt, sigma_t), teacher_logits, self.direction).mean()


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, direction: str) -> Tensor:
    """Per-token KL over the vocabulary, float32."""
    ls = student_logits.float().log_softmax(-1)
    lt = teacher_logits.float().log_softmax(-1)
    if direction == "kl-bwd":
        return (ls.exp() * (ls - lt)).sum(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


class Distiller(Session):
    """One rank's state of a DCD run (the harness's :class:`Session`): the student (``model``),
    its frozen teacher and ``train_step(step)``, one optimizer update."""

    command = "distill"
    order_seed = 3
    scalar_prefix = "distill"
    scalar_keys = ("loss", "dt", "lr", "grad_norm")

    def load_source(self) -> None:
        from duo_fast.io.pretrained import load_pretrained

        cfg = self.cfg
        # public init: the raw weights (the EMA is continued separately); init=ema: the EMA weights
        self.student, self.info = load_pretrained(cfg.checkpoint, device=self.device, ema=cfg.init == "ema")
        K = self.student.config.vocab_size
        self.length = cfg.length or self.student.config.model_length
        self.tokenizer_name = cfg.tokenizer or self.info.extra.get("tokenizer") or (tokenizer_for_vocab(K) or "")
        if not self.tokenizer_name:
            raise ValueError("the checkpoint names no tokenizer: pass --tokenizer")
        self.tokenizer_vocab = self.info.extra.get("tokenizer_vocab", cfg.tokenizer_vocab)

    def check_tokenizer(self) -> None:
        check_tokenizer_vocab(self.tokenizer, self.student.config.vocab_size)

    def too_few_blocks_message(self) -> str:
        return f"only {self.train_blocks.shape[0]} blocks of length {self.length} for a batch of {self.cfg.batch_size}"

    def build_model(self) -> DiT:
        self.student.train()
        return self.student

    def objective_module(self) -> nn.Module:
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.teacher.autocast = False             # the teacher's targets in float32 (section 6), not bf16 autocast
        return DCDObjective(self.student, self.cfg.loss)

    def optimizer_args(self) -> dict[str, Any]:
        cfg = self.cfg
        return dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=cfg.grad_clip,
                    lr_lambda=lr_multiplier("constant", cfg.lr, cfg.warmup_steps, cfg.steps))

    def source_ema_state(self) -> dict[str, Any] | None:
        return self.info.ema_state if self.cfg.init == "public" else None

    def finish_setup(self) -> None:
        cfg = self.cfg
        self.table = TTable.build(self.vocab_size, min(-5.0, cfg.gamma_min), max(-1.0, cfg.gamma_max))
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)     # reseeded per micro-batch

    def train_step(self, step: int, check: bool = False) -> tuple[Tensor, Tensor, list[int]]:
        """One optimizer update with no host read (the teacher refreshed first at a round boundary)."""
        cfg, span = self.cfg, self.cfg.gamma_max - self.cfg.gamma_min
        _, dt = dcd_gap(step, cfg)
        if step > 0 and step % cfg.update_every == 0:   # a new round: the teacher takes the student's (or EMA) weights
            with torch.no_grad(), self.engine.gathered():
                src = self.ema if cfg.teacher_from == "ema" else [p.detach() for p in self.student.parameters()]
                torch._foreach_copy_(list(self.teacher.parameters()), src)
        self.objective.train()
        losses, sums = [], []
        for j in range(self.accum):
            slot = j * self.world + self.rank
            self.gen.manual_seed(micro_seed(cfg.seed, step, slot, 1))
            torch.manual_seed(micro_seed(cfg.seed, step, slot, 2))
            x0, crc = self.feeder.next()
            sums.append(crc)
            t = stratified_times(self.micro, generator=self.gen, device=self.device, dtype=torch.float64,
                                 strata=cfg.batch_size, first=(self.rank * self.accum + j) * self.micro)
            t = (t + dt).clamp(0.0, 1.0)
            s = t - dt
            gamma_t, gamma_s = cfg.gamma_min + t * span, cfg.gamma_min + s * span
            alpha_t, alpha_s = self.table.alpha_and_derivative(gamma_t)[0], self.table.alpha_and_derivative(gamma_s)[0]
            zt, zs = coupled_latents(x0, gamma_t, gamma_s, self.vocab_size, seed=micro_seed(cfg.seed, step, slot, 3))
            with torch.no_grad():
                teacher_logits = self.teacher(zs, (-torch.log(alpha_s)).float())
            loss = self._forward(zt, (-torch.log(alpha_t)).float(), teacher_logits)
            self.engine.backward(loss)
            self.engine.step(~torch.isfinite(loss.detach()))
            losses.append(loss.detach())
        self.update_ema()
        mean = torch.stack(losses).mean()
        return mean, ~torch.isfinite(mean), sums

    # -- what the harness logs -----------------------------------------------------------------

    def new_metrics(self) -> dict[str, Any]:
        return {"losses": [], "best": {}, "validations": []}

    def checkpoint_state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "losses": metrics["losses"], "best": metrics["best"],
                "validations": metrics["validations"]}

    def restore_state(self, shared: dict[str, Any]) -> None:
        self.teacher.load_state_dict(shared["teacher"])

    def metrics_from(self, shared: dict[str, Any]) -> dict[str, Any]:
        return {"losses": shared["losses"], "best": shared.get("best", {}), "validations": shared.get("validations", [])}

    def export_extra(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_name, "tokenizer_vocab": self.tokenizer_vocab,
                "distilled_from": self.cfg.checkpoint, "steps": self.cfg.steps}

    def announce(self, resumed: Path | None, start: int) -> None:
        cfg = self.cfg
        engine = f"DeepSpeed ZeRO-{cfg.zero_stage}" if cfg.zero_stage else "PyTorch"
        print(f"duo-fast distill: {self.info.preset} model from {cfg.checkpoint}, K={self.vocab_size}, L={self.length}, "
              f"batch={cfg.batch_size} ({self.world} x {self.micro} x {self.accum}), {engine}, {cfg.steps} steps, "
              f"rounds of {cfg.update_every}, {cfg.loss}, device={self.device}"
              + (f"; resumed at step {start}" if resumed is not None else ""))
        if self.ema is not None:
            src = ("the checkpoint's EMA" if cfg.init == "public" and self.info.ema_state is not None
                   else "the student's weights")
            print(f"duo-fast distill: student from the {'raw' if cfg.init == 'public' else 'EMA'} weights; EMA from "
                  f"{src}, decay {self.ema_decay}, {self.ema_updates} updates so far")

    def plan_step(self, step: int) -> StepPlan:
        cfg = self.cfg
        rnd, dt = dcd_gap(step, cfg)
        refreshed = step > 0 and step % cfg.update_every == 0
        logging = step % cfg.log_every == 0 or step == cfg.steps - 1 or refreshed
        return StepPlan(logging, info={"round": rnd, "dt": dt, "teacher_refreshed": refreshed})

    def account(self, metrics: dict[str, Any], plan: StepPlan, read: dict[str, Any], finite: list[float],
                seconds: float) -> None:
        metrics["losses"].extend(finite)

    def all_skipped_message(self, read: dict[str, Any]) -> str:
        return (f"the distillation loss was not finite at every step from {read['steps'][0]} to "
                f"{read['steps'][-1]}; no update was applied")

    def postfix(self, plan: StepPlan, loss: float) -> dict[str, str]:
        return {"loss": f"{loss:.4f}", "dt": f"{plan.info['dt']:.4f}"}

    def log_fields(self, step: int, plan: StepPlan, read: dict[str, Any], sums: list[list[int]], seconds: float,
                   finite: list[float]) -> dict[str, Any]:
        return {**plan.info, "lr": self.engine.lr(), "grad_norm": self.engine.grad_norm(),
                "skipped_steps": read["skipped"]}

    def console_line(self, step: int, plan: StepPlan, loss: float, rec: dict[str, Any]) -> str:
        return f"step {step}/{self.cfg.steps} loss {loss:.4f} dt {plan.info['dt']:.4f}"

    def summary(self, metrics: dict[str, Any], val_end: float, seconds: float, start: int) -> dict[str, Any]:
        cfg, losses = self.cfg, metrics["losses"]
        n = max(1, min(10, len(losses) // 4))
        return {"loss_first": sum(losses[:n]) / n, "loss_last": sum(losses[-n:]) / n,
                "rounds": dcd_gap(cfg.steps - 1, cfg)[0] + 1,
                "tokens_per_s": (cfg.steps - start) * cfg.batch_size * self.length / max(seconds, 1e-9),
                "val_nelbo_end": val_end}

    def print_summary(self, summary: dict[str, Any], metrics: dict[str, Any]) -> None:
        print(f"distillation loss ({self.cfg.loss}): start {summary['loss_first']:.4f} -> end "
              f"{summary['loss_last']:.4f} over {summary['rounds']} rounds; {summary['tokens_per_s']:,.0f} tokens/s")
        print(f"exported {'EMA' if self.ema is not None else 'raw'} weights to {summary['export']}")


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run DCD; writes ``out/log.jsonl``, ``out/checkpoints``, ``out/export`` (HF layout) and
    ``out/summary.json``. Returns the summary on rank 0, ``{}`` on the other ranks."""
    return run_session(Distiller, cfg)
