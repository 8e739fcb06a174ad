"""Duo training: the Gaussian-latent curriculum, then USDM (docs/math.md sections 3-5), as an
objective of the training harness (``training.harness``: one process, or DeepSpeed ZeRO 1-3 on any
number of processes under ``torchrun`` / ``deepspeed``).

Per step: stratified times ``t``; during the curriculum
``gamma_t = gamma_min + t (gamma_max - gamma_min)``, ``alpha_t = T(gamma_t)``,
``alpha'_t = (gamma_max - gamma_min) T'(gamma_t)``, Gaussian latents ``w = at e_x + st eps``,
``z_t = argmax w`` and the denoiser's input is the relaxed ``softmax(w / tau) @ E``
(``ops.relaxed_embedding``: the noise never exists as a B x L x K tensor); afterwards
``z_t ~ q_t`` under the log-linear schedule and the input is ``E[z_t]``. The loss is the
Rao-Blackwellized NELBO at ``(z_t, alpha_t, alpha'_t)`` in both phases (``ops.rb_loss_linear``
by default: fused with the output projection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from duo_fast.core.devices import device_peaks
from duo_fast.core.draws import stratified_times
from duo_fast.core.options import option
from duo_fast.core.seeds import micro_seed
from duo_fast.eval.nelbo import discrete_nelbo_draws
from duo_fast.model import DiT, DiTConfig
from duo_fast.ops import rb_loss, rb_loss_linear, relaxed_embedding
from duo_fast.ops.relaxed import resolve_mode
from duo_fast.ops.ttable import TTable
from duo_fast.training.checkpoints import gather_ints, latest_checkpoint
from duo_fast.training.config import RunConfig
from duo_fast.training.engine import TorchEngine
from duo_fast.training.harness import Session, StepPlan, run_session
from duo_fast.training.lr_schedule import lr_multiplier

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train", "Trainer", "DuoObjective", "tau_at", "latest_checkpoint",
           "model_flops_per_token"]


@dataclass
class TrainConfig(RunConfig):
    """Every option of ``duo-fast train``: the harness's (:class:`RunConfig`) and the Duo objective's;
    the defaults are the public recipe's where it has one."""

    model: str = option("small", "denoiser preset (docs/math.md section 7)", choices=("tiny", "small", "medium"))
    lr_schedule: str = option("constant", "after the warm-up: constant, cosine (decay to 1e-6 at the last step) or step "
                                          "(halved every lr_halve_every steps); docs/training.md",
                              choices=("constant", "cosine", "step"))
    lr_halve_every: int = option(10_000, "steps between halvings of lr_schedule=step")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    dropout: float = option(0.1, "dropout of the denoiser's residual branches")
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
    tensorboard: bool = option(False, "also log to TensorBoard (OUT/tb) when tensorboard is installed")
    fused_loss: bool = option(True, "loss fused with the output projection (rb_loss_linear: no B x L x K logits); "
                                "false: logits, then rb_loss")
    check_every: int = option(100, "every N steps (a multiple of log_every: a log step) the logits are checked for "
                                   "NaN/inf by name (0: never); between checks a non-finite step is skipped on the device")
    compile: bool = option(False, "torch.compile the denoiser's blocks")

    def __post_init__(self) -> None:
        if self.length < 2:
            raise ValueError(f"--length must be >= 2, got {self.length}")
        super().__post_init__()
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"gamma_min ({self.gamma_min}) must be below gamma_max ({self.gamma_max})")
        if self.curriculum_end and self.curriculum_end < self.curriculum_start:
            raise ValueError("curriculum_end must not precede curriculum_start")
        if self.check_every < 0 or (self.check_every and self.check_every % self.log_every):
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


class Trainer(Session):
    """One rank's state of a Duo training run (the harness's :class:`Session`): ``loss_on(x0, step)``
    is the objective of one micro-batch, ``train_step(step)`` one optimizer update from this rank's
    micro-batches, ``step(x0, step)`` one update from a given batch (plain engine; tests and notebooks)."""

    command = "train"
    order_seed = 2
    scalar_prefix = "train"
    scalar_keys = ("loss", "grad_norm", "lr", "tokens_per_s")
    validations_key = "val_history"

    def load_source(self) -> None:
        cfg = self.cfg
        self.tokenizer_name, self.tokenizer_vocab, self.length = cfg.tokenizer, cfg.tokenizer_vocab, cfg.length

    def build_model(self) -> DiT:
        cfg = self.cfg
        model = DiT(DiTConfig.from_name(cfg.model, vocab_size=len(self.tokenizer), model_length=cfg.length,
                                        dropout=cfg.dropout)).to(self.device)
        self._init_ema = _init_from(model, cfg) if cfg.init_from else None
        if cfg.compile:
            model.compile_blocks()
        return model

    def objective_module(self) -> nn.Module:
        return DuoObjective(self.model, self.cfg, self.pad_id)

    def optimizer_args(self) -> dict[str, Any]:
        cfg = self.cfg
        return dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                    lr_lambda=lr_multiplier(cfg.lr_schedule, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_halve_every))

    def source_ema_state(self) -> dict[str, Any] | None:
        return self._init_ema

    def finish_setup(self) -> None:
        cfg, K = self.cfg, self.vocab_size
        self.ttable = None
        if cfg.curriculum_end > 0:
            self.ttable = TTable.build(K, min(-5.0, cfg.gamma_min), max(-1.0, cfg.gamma_max))
            self.ttable.check_vocab(K)
        # the noise of each micro-batch is reseeded from (seed, step, slot): see duo_fast.core.seeds
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)

    # -- one step ------------------------------------------------------------------------------

    def next_batch(self) -> Tensor:
        """This rank's next micro-batch of blocks (a seeded permutation per epoch, sharded by rank)."""
        return self.feeder.next()[0]

    def in_curriculum(self, step: int) -> bool:
        return self.ttable is not None and step < self.cfg.curriculum_end

    def draw_inputs(self, x0: Tensor, step: int, discrete: bool, kernel_seed: int, slot: int | None) -> dict[str, Any]:
        """The random part of one objective evaluation (sections 3-5), drawn from ``self.gen``.
        ``slot`` (training micro-batches): the times are this micro-batch's slice of strata over
        the global batch, as the public trainer draws them; None: strata over ``x0`` alone."""
        cfg = self.cfg
        strata, first = None, 0
        if slot is not None:
            rank, j = slot % self.world, slot // self.world
            strata, first = cfg.batch_size, (rank * self.accum + j) * x0.shape[0]
        if self.in_curriculum(step) and not discrete:
            t = stratified_times(x0.shape[0], generator=self.gen, device=self.device, dtype=torch.float64,
                                 strata=strata, first=first)
            gamma = cfg.gamma_min + t * (cfg.gamma_max - cfg.gamma_min)
            alpha, dT = self.ttable.alpha_and_derivative(gamma)
            return dict(sigma=(-torch.log(alpha)).float(), alpha=alpha, dalpha=(cfg.gamma_max - cfg.gamma_min) * dT,
                        gamma=gamma, tau=tau_at(cfg, step), seed=kernel_seed)
        zt, alpha, dalpha = discrete_nelbo_draws(x0, self.vocab_size, self.gen, strata=strata, first=first)
        return dict(sigma=(-torch.log(alpha)).float(), alpha=alpha, dalpha=dalpha, zt=zt)

    def checks_at(self, step: int) -> bool:
        """Whether ``step`` runs the checked mode (a host read; only ever on a log step)."""
        return self.cfg.check_every > 0 and step % self.cfg.check_every == 0

    def loss_on(self, x0: Tensor, step: int, model: DiT | None = None, discrete: bool = False, slot: int = 0,
                check: bool = False, training: bool = True) -> Tensor:
        """Mean per-token NELBO of micro-batch ``x0`` (B, L) at training step ``step``; its noise
        comes from ``(seed, step, slot)``; ``training``: its times are its slice of the global
        batch's strata (else strata over ``x0``)."""
        self.gen.manual_seed(micro_seed(self.cfg.seed, step, slot, 1))
        torch.manual_seed(micro_seed(self.cfg.seed, step, slot, 2))          # dropout
        inputs = self.draw_inputs(x0, step, discrete, micro_seed(self.cfg.seed, step, slot, 3),
                                  slot if training else None)
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
            self.engine.step(~torch.isfinite(loss.detach()))
            losses.append(loss.detach())
        mean = torch.stack(losses).mean() if len(losses) > 1 else losses[0]
        self.update_ema()
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
        self.update_ema()
        return float(loss.detach()), self.engine.grad_norm()

    # -- what the harness logs -----------------------------------------------------------------

    def new_metrics(self) -> dict[str, Any]:
        return {"losses": {"curriculum": [], "discrete": []}, "tokens": {"curriculum": 0, "discrete": 0},
                "seconds": {"curriculum": 0.0, "discrete": 0.0}, "val_start": None, "val_curriculum": None}

    def checkpoint_state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"metrics": metrics}

    def export_extra(self) -> dict[str, Any]:
        return {"tokenizer": self.cfg.tokenizer, "tokenizer_vocab": self.cfg.tokenizer_vocab}

    def announce(self, resumed: Path | None, start: int) -> None:
        cfg = self.cfg
        engine = f"DeepSpeed ZeRO-{cfg.zero_stage}" if cfg.zero_stage else "PyTorch"
        print(f"duo-fast train: {cfg.model} model ({self.model.config.num_parameters() / 1e6:.1f}M params), "
              f"K={self.vocab_size}, L={cfg.length}, batch={cfg.batch_size} ({self.world} x {self.micro} x "
              f"{self.accum} accumulation), {engine}, {self.train_blocks.shape[0]} train / "
              f"{self.val_blocks.shape[0]} val blocks, device={self.device}, curriculum for "
              f"{min(cfg.curriculum_end, cfg.steps)} of {cfg.steps} steps"
              + (f"; resumed from {resumed} at step {start}" if resumed is not None else ""))

    def on_start(self, metrics: dict[str, Any]) -> None:
        if metrics["val_start"] is None:
            metrics["val_start"] = self.validate(use_ema=False)
        peaks = device_peaks(self.device)
        self.flops_tok, self.peak = model_flops_per_token(self.model.config, self.cfg.length), peaks[0] if peaks else None

    def plan_step(self, step: int) -> StepPlan:
        cfg = self.cfg
        phase = "curriculum" if self.in_curriculum(step) else "discrete"
        last_of_phase = step == cfg.steps - 1 or (phase == "curriculum" and step + 1 == cfg.curriculum_end)
        logging = step % cfg.log_every == 0 or last_of_phase
        return StepPlan(logging, check=logging and self.checks_at(step), info={"phase": phase})

    def account(self, metrics: dict[str, Any], plan: StepPlan, read: dict[str, Any], finite: list[float],
                seconds: float) -> None:
        phase = plan.info["phase"]
        metrics["seconds"][phase] += seconds
        metrics["tokens"][phase] += len(read["steps"]) * self.cfg.batch_size * self.cfg.length
        metrics["losses"][phase].extend(finite)

    def postfix(self, plan: StepPlan, loss: float) -> dict[str, str]:
        return {"loss": f"{loss:.3f}", "phase": plan.info["phase"][:5]}

    def log_fields(self, step: int, plan: StepPlan, read: dict[str, Any], sums: list[list[int]], seconds: float,
                   finite: list[float]) -> dict[str, Any]:
        phase = plan.info["phase"]
        checksums = gather_ints(sums[-1], self.device)                  # a collective: every rank logs
        tps = len(read["steps"]) * self.cfg.batch_size * self.cfg.length / seconds
        return {"loss_mean": sum(finite) / len(finite) if finite else None, "grad_norm": self.engine.grad_norm(),
                "lr": self.engine.lr(), "phase": phase, "tau": tau_at(self.cfg, step) if phase == "curriculum" else None,
                "tokens_per_s": tps, **(self._relaxation_record() if phase == "curriculum" else {}),
                "mfu": tps * self.flops_tok / self.peak if self.peak else None, "skipped_steps": read["skipped"],
                "batch_checksums": checksums}

    def console_line(self, step: int, plan: StepPlan, loss: float, rec: dict[str, Any]) -> str:
        return f"step {step}/{self.cfg.steps} {plan.info['phase']} loss {loss:.4f} {rec['tokens_per_s']:,.0f} tokens/s"

    def _relaxation_record(self) -> dict[str, Any]:
        """The last curriculum step's relaxation for the log: its mode and, for adaptive, the
        largest bound achieved, the mean and largest k and the fraction of tokens capped."""
        st = self.objective.relax_stats
        out: dict[str, Any] = {"relax_mode": st.get("mode")}
        for k in ("bound_max", "k_mean", "k_max", "capped"):
            if k in st:
                out[f"relax_{k}"] = float(st[k])
        return out

    def after_interval(self, metrics: dict[str, Any], step: int, plan: StepPlan) -> None:
        cfg = self.cfg
        if plan.info["phase"] == "curriculum" and step + 1 == cfg.curriculum_end and step + 1 < cfg.steps:
            metrics["val_curriculum"] = self.validate()

    def summary(self, metrics: dict[str, Any], val_end: float, seconds: float, start: int) -> dict[str, Any]:
        phases = {}
        for k, v in metrics["losses"].items():
            if v:
                n = max(1, min(20, len(v) // 4))
                phases[k] = {"steps": len(v), "loss_first": sum(v[:n]) / n, "loss_last": sum(v[-n:]) / n, "window": n}
        tokens_per_s = {k: metrics["tokens"][k] / metrics["seconds"][k] for k in metrics["tokens"]
                        if metrics["seconds"][k] > 0}
        return {"train_loss": phases, "val_nelbo_start": metrics["val_start"],
                "val_nelbo_after_curriculum": metrics["val_curriculum"], "val_nelbo_end": val_end,
                "val_ppl_bound_end": math.exp(min(val_end, 50.0)), "tokens_per_s": tokens_per_s,
                "mfu": {k: v * self.flops_tok / self.peak for k, v in tokens_per_s.items()} if self.peak else None,
                "steps_done": self.cfg.steps}

    def print_summary(self, summary: dict[str, Any], metrics: dict[str, Any]) -> None:
        _print_summary(summary, metrics, self.ema is not None)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; writes ``out/log.jsonl``, ``out/checkpoints``, ``out/export`` and ``out/summary.json``
    (docs/training.md). Returns the summary on rank 0, ``{}`` on the other ranks."""
    return run_session(Trainer, cfg)


def _init_from(model: DiT, cfg: TrainConfig) -> dict[str, Any] | None:
    """Load ``cfg.init_from`` into ``model`` (sizes must match); returns a .ckpt's EMA state, if any."""
    from duo_fast.io.pretrained import CheckpointError, load_pretrained

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


def model_flops_per_token(cfg: DiTConfig, length: int) -> float:
    """Training FLOPs per token: forward and backward, 3x the forward's
    (:meth:`DiTConfig.forward_flops_per_token`; the curriculum's relaxation is not counted)."""
    return 3.0 * cfg.forward_flops_per_token(length)


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
