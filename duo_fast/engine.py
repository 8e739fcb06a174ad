"""The optimizer engines of the trainer: plain PyTorch in one process, or DeepSpeed ZeRO 1-3
(any number of processes, started by ``torchrun`` or ``deepspeed``). Both expose the same small
interface: ``backward(loss)``, ``step() -> bool`` (True at a gradient-accumulation boundary,
where the optimizer stepped), ``grad_norm()``, ``lr()``, ``save(dir)`` / ``load(dir)`` and
``gathered()`` (a context in which every parameter is whole: ZeRO-3 partitions them).

The ZeRO configurations shipped are ``duo_fast/configs/zero{1,2,3}.json``; the trainer fills in
the batch sizes, accumulation, clipping, AdamW, the warm-up schedule and the precision (bf16 on
GPU, fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["world_info", "placement", "init_distributed", "TorchEngine", "DeepSpeedEngine", "zero_config", "barrier"]

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


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


class TorchEngine:
    """One process: AdamW, linear warm-up, clipping, gradient accumulation over ``accum`` micro-batches."""

    def __init__(self, module: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                 warmup_steps: int, grad_clip: float, accum: int) -> None:
        self.module, self.accum, self.grad_clip = module, accum, grad_clip
        self.opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _warmup(s, warmup_steps))
        self._micro, self._norm = 0, 0.0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> bool:
        self._micro += 1
        if self._micro % self.accum:
            return False
        limit = self.grad_clip if self.grad_clip > 0 else math.inf
        self._norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), limit))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return True

    def grad_norm(self) -> float:
        return self._norm

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


class DeepSpeedEngine:
    """DeepSpeed ZeRO ``stage`` around ``module``; ``micro`` sequences per rank per micro-step,
    ``accum`` micro-steps per optimizer step."""

    def __init__(self, module: nn.Module, stage: int, micro: int, accum: int, world: int, lr: float,
                 betas: tuple[float, float], weight_decay: float, warmup_steps: int, grad_clip: float,
                 device: torch.device, extra_config: dict[str, Any] | None = None) -> None:
        import deepspeed

        cfg: dict[str, Any] = {
            "train_batch_size": micro * accum * world, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum, "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
            "zero_optimization": zero_config(stage),
            "bf16": {"enabled": device.type == "cuda"}, "fp16": {"enabled": False},
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8,
                                                      "weight_decay": weight_decay, "torch_adam": True}},
            "steps_per_print": 2**62, "wall_clock_breakdown": False,
        }
        cfg.update(extra_config or {})
        self.stage, self.module = stage, module
        # the same linear warm-up as the PyTorch engine: a LambdaLR on DeepSpeed's base optimizer,
        # stepped by the engine at accumulation boundaries and saved in its checkpoints
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=module, config=cfg, model_parameters=[p for p in module.parameters()],
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup(s, warmup_steps)))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
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
