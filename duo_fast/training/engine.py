"""The optimizer engines of the trainer: plain PyTorch in one process, or DeepSpeed ZeRO 1-3
(any number of processes, started by ``torchrun`` or ``deepspeed``). Both expose the same small
interface: ``backward(loss)``, ``step(bad=None) -> bool`` (True at a gradient-accumulation
boundary, where the optimizer stepped), ``grad_norm()``, ``lr()``, ``save(dir)`` / ``load(dir)``
and ``gathered()`` (a context in which every parameter is whole: ZeRO-3 partitions them).

Nothing in ``backward`` or ``step`` reads a value back to the host: the gradient norm stays a
device tensor (read by ``grad_norm()``, which the loops call at log steps only), and a
non-finite step is skipped on the device, as AMP's gradient scaler does: the fused AdamW takes a
``found_inf`` tensor and leaves weights, moments and step counts untouched when it is set.
``bad`` (a device bool, e.g. a non-finite loss) is folded into that flag; under several ranks
it is all-reduced on the device first, so every rank skips the same steps.

Precision: the module's weights are float32 in both engines; on CUDA the denoiser runs its
blocks under bf16 autocast (``DiT.forward``), as the public trainer does. DeepSpeed's own bf16
mode (bf16 weights) is not used, so the EMA and every export come from float32 weights.

One host read is DeepSpeed's, not ours: ZeRO-1/2's ``step`` checks its global gradient norm on
the host (``is_invalid_grad_norm``: one synchronisation per optimizer step) whenever it computes
that norm, which gradient clipping needs. With ``--grad-clip 0``, :func:`ds_config` sets
``zero_optimization.compute_grad_norm=false`` (where DeepSpeed has it), which removes the read;
``grad_norm()`` is then NaN in the log.

The ZeRO configurations shipped are ``duo_fast/training/configs/zero{1,2,3}.json``; the trainer fills
in the batch sizes, accumulation, clipping, AdamW and the warm-up schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["world_info", "placement", "init_distributed", "TorchEngine", "DeepSpeedEngine", "zero_config", "ds_config",
           "barrier"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (1 process without one)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def placement(device: torch.device, batch_size: int, micro_batch_size: int,
              zero_stage: int) -> tuple[torch.device, int, int, int, int]:
    """(device of this rank, rank, world, micro-batch per rank, accumulation steps), with the
    batch layout checked: ``batch_size = micro x accumulation x world``."""
    rank, world, local = world_info()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and zero_stage == 0:
        raise ValueError(f"{world} processes need DeepSpeed: set zero_stage to 1, 2 or 3")
    micro = micro_batch_size or batch_size // world
    if micro < 1 or batch_size % (micro * world):
        raise ValueError(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro} x {world} processes")
    return device, rank, world, micro, batch_size // (micro * world)


def init_distributed(device: torch.device) -> None:
    """Join the process group the launcher describes: NCCL on GPU, gloo on CPU."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and world_info()[1] > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def zero_config(stage: int) -> dict[str, Any]:
    """The shipped ZeRO section for ``stage`` (1, 2 or 3)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    return json.loads((CONFIG_DIR / f"zero{stage}.json").read_text())


def _fused_adamw_ok(params: list[nn.Parameter]) -> bool:
    """torch's fused AdamW runs on CPU and CUDA float tensors (one kernel for all parameters)."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def _fold(acc: torch.Tensor | None, bad: torch.Tensor | None) -> torch.Tensor | None:
    """OR of the micro-batches' device flags so far."""
    return bad if acc is None else acc if bad is None else acc | bad


def _skip_flag(bad: torch.Tensor | None, norm: torch.Tensor | None) -> torch.Tensor | None:
    """A float 0-d device tensor, 1 when the step must be skipped (all-reduced over ranks)."""
    import torch.distributed as dist

    flags = [f for f in (bad, None if norm is None else ~torch.isfinite(norm)) if f is not None]
    if not flags:
        return None
    flag = flags[0] if len(flags) == 1 else flags[0] | flags[1]
    flag = flag.reshape(()).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)          # asynchronous on the device: no host wait
    return flag


class TorchEngine:
    """One process: AdamW (fused), the learning-rate multiplier ``lr_lambda(update)``
    (``duo_fast.training.lr_schedule``), clipping, gradient accumulation over ``accum`` micro-batches;
    non-finite steps skipped on the device."""

    def __init__(self, module: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                 lr_lambda: Callable[[int], float], grad_clip: float, accum: int) -> None:
        self.module, self.accum, self.grad_clip = module, accum, grad_clip
        params = list(module.parameters())
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay,
                                     fused=_fused_adamw_ok(params))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        self._micro = 0
        self._norm: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self, bad: torch.Tensor | None = None) -> bool:
        """``bad``: a device bool, True when this micro-batch's loss is unusable."""
        self._micro += 1
        self._bad = _fold(self._bad, bad)
        if self._micro % self.accum:
            return False
        limit = self.grad_clip if self.grad_clip > 0 else math.inf
        self._norm = torch.nn.utils.clip_grad_norm_(self.params, limit, foreach=True)
        flag = _skip_flag(self._bad, self._norm)
        if self.opt.defaults.get("fused"):
            self.opt.found_inf = flag                     # fused AdamW skips the whole update when set
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self._bad = None
        return True

    def grad_norm(self) -> float:
        """The last optimizer step's gradient norm (a host read: call it at log steps only)."""
        return float(self._norm) if self._norm is not None else 0.0

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def save(self, path: Path) -> None:
        torch.save({"module": self.module.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "micro": self._micro}, path / "engine.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "engine.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self._micro = state["micro"]


def _deepspeed_has_zero_field(name: str) -> bool:
    """Whether the installed DeepSpeed's ZeRO config knows ``name`` (newer fields are refused by older ones)."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return False
    fields = getattr(DeepSpeedZeroConfig, "model_fields", None) or getattr(DeepSpeedZeroConfig, "__fields__", {})
    return name in fields


def ds_config(stage: int, micro: int, accum: int, world: int, lr: float, betas: tuple[float, float],
              weight_decay: float, grad_clip: float, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed configuration of a run: batch layout, clipping, the shipped ZeRO section,
    float32 weights (no DeepSpeed bf16/fp16 mode: see the module docstring) and torch's AdamW,
    fused on CPU and CUDA."""
    zero = zero_config(stage)
    if stage in (1, 2) and grad_clip <= 0 and _deepspeed_has_zero_field("compute_grad_norm"):
        zero["compute_grad_norm"] = False        # no clipping: skip ZeRO-1/2's per-step host read of the norm
    return {
        "train_batch_size": micro * accum * world, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum, "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8,
                                                  "weight_decay": weight_decay, "torch_adam": True,
                                                  "fused": device.type in ("cpu", "cuda")}},
        "steps_per_print": 2**62, "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO ``stage`` around ``module``; ``micro`` sequences per rank per micro-step,
    ``accum`` micro-steps per optimizer step."""

    def __init__(self, module: nn.Module, stage: int, micro: int, accum: int, world: int, lr: float,
                 betas: tuple[float, float], weight_decay: float, lr_lambda: Callable[[int], float], grad_clip: float,
                 device: torch.device, extra_config: dict[str, Any] | None = None) -> None:
        import deepspeed

        cfg = ds_config(stage, micro, accum, world, lr, betas, weight_decay, grad_clip, device)
        cfg.update(extra_config or {})
        self.stage, self.module = stage, module
        self._bad: torch.Tensor | None = None
        # the same schedule as the PyTorch engine: a LambdaLR on DeepSpeed's base optimizer,
        # stepped by the engine at accumulation boundaries and saved in its checkpoints
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=module, config=cfg, model_parameters=[p for p in module.parameters()],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, bad: torch.Tensor | None = None) -> bool:
        """``bad`` (device bool) skips the update through the base AdamW's ``found_inf``, agreed
        by all ranks; the gradient norm is DeepSpeed's own (non-finite gradients with a finite
        loss are not detected here: DeepSpeed checks overflow only in fp16 mode)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self._bad = _fold(self._bad, bad)
        if boundary:
            flag = _skip_flag(self._bad, None)
            base = getattr(self.opt, "optimizer", self.opt)          # ZeRO wraps the torch optimizer
            if getattr(base, "defaults", {}).get("fused"):
                base.found_inf = flag
            self._bad = None
        self.engine.step()
        return boundary

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def gathered(self) -> contextlib.AbstractContextManager:
        """Every parameter whole (a collective under ZeRO-3: all ranks must enter)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def save(self, path: Path) -> None:
        """A collective: every rank writes its shards under ``path``."""
        self.engine.save_checkpoint(str(path), tag="engine")

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
