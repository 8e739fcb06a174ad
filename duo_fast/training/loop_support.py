"""What the training harness uses to run without host round trips (the per-micro-batch seeds
are :func:`duo_fast.core.seeds.micro_seed`).
* :class:`BatchFeeder`: the next micro-batch is gathered from the memory map, pinned and
  copied with ``non_blocking`` while the current one computes (CUDA); its data position is the
  one before the staged batch, so a checkpoint resumes at the right block.
* :class:`IntervalMeter`: per-step losses, skip flags and the like stay device tensors and are
  read once per log interval (one host read, one collective).
* :func:`agreed_stop`: the signal flag OR-ed over ranks at every step boundary through a gloo
  group on host tensors (no device work), so every rank checkpoints the same step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from duo_fast.data.blocks import BlockOrder

__all__ = ["BatchFeeder", "IntervalMeter", "agreed_stop", "exit_after_checkpoint", "ema_decay",
           "continue_ema", "open_wandb"]

class BatchFeeder:
    """This rank's micro-batches from ``blocks`` (N, L) int64 in ``order``'s sequence, one staged
    ahead. ``next() -> (x0 (micro, L) int64 on device, crc32 of the block indices)``."""

    def __init__(self, blocks: Tensor, order: BlockOrder, device: torch.device) -> None:
        self.blocks, self.order, self.device = blocks, order, device
        self.pin = device.type == "cuda"
        self._staged: tuple[Tensor, int] | None = None
        self._state_before: dict[str, int] | None = None

    def _stage(self) -> None:
        import zlib

        self._state_before = self.order.state_dict()
        idx = self.order.next_indices()
        rows = self.blocks[idx]
        if self.pin:
            rows = rows.pin_memory()
        self._staged = (rows.to(self.device, non_blocking=True), zlib.crc32(idx.numpy().tobytes()))

    def next(self) -> tuple[Tensor, int]:
        if self._staged is None:
            self._stage()
        out = self._staged
        self._stage()
        return out

    def state_dict(self) -> dict[str, int]:
        """The data position of the next micro-batch ``next()`` returns."""
        return self._state_before if self._staged is not None else self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state)
        self._staged = self._state_before = None


class IntervalMeter:
    """Per-step device values of one log interval; :meth:`read` turns them into host floats
    (mean over ranks) with one device read and one collective."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[int] = []
        self._loss: list[Tensor] = []
        self._bad: list[Tensor] = []

    def add(self, step: int, loss: Tensor, bad: Tensor) -> None:
        """loss: 0-d float device tensor (this rank's mean over its micro-batches); bad: 0-d bool."""
        self.steps.append(step)
        self._loss.append(loss.detach().reshape(()).double())
        self._bad.append(bad.detach().reshape(()).double())

    def __len__(self) -> int:
        return len(self.steps)

    def read(self) -> dict[str, Any]:
        """{steps, losses (mean over ranks per step), skipped (steps any rank skipped)}; resets."""
        import torch.distributed as dist

        if not self.steps:
            return {"steps": [], "losses": [], "skipped": []}
        n = len(self.steps)
        packed = torch.cat([torch.stack(self._loss), torch.stack(self._bad)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
            packed[:n] /= dist.get_world_size()
        values = packed.cpu().tolist()                     # the one host read of the interval
        out = {"steps": self.steps, "losses": values[:n],
               "skipped": [s for s, b in zip(self.steps, values[n:]) if b > 0]}
        self.steps, self._loss, self._bad = [], [], []
        return out


_CONTROL_GROUP: Any = None


def agreed_stop(local: bool) -> bool:
    """True on every rank when any rank has ``local`` set (host tensors over a gloo group: the
    device is never touched). One process: ``local`` itself."""
    global _CONTROL_GROUP
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    flag = torch.zeros(1, dtype=torch.int32)
    if local:
        flag += 1
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(flag.numpy()[0])


def exit_after_checkpoint(command: str, signum: int | None, step: int, path: Any, rank0: bool) -> None:
    """After the stop checkpoint: say where it is (rank 0) and exit with ``128 + signal``
    (SIGTERM's when the signal reached another rank only)."""
    import signal

    if rank0:
        print(f"duo-fast {command}: signal {signum or 'on another rank'} at step {step}: checkpoint {path}; "
              f"run the same command to continue")
    raise SystemExit(128 + (signum or signal.SIGTERM))


def ema_decay(decay: float, n: int) -> float:
    """The public EMA's decay at its ``n``-th update (n >= 1): ``min(decay, (1 + n)/(10 + n))``,
    a warm-up that keeps the average from being dominated by the first weights."""
    return min(decay, (1 + n) / (10 + n))


def continue_ema(ema: list[Tensor], model: torch.nn.Module, state: dict[str, Any], decay: float) -> tuple[float, int]:
    """Load a checkpoint's EMA (``PretrainedInfo.ema_state``: shadow weights by parameter name,
    decay, update count) into ``ema`` (the model's parameter order), as the public trainer's
    ``on_load_checkpoint`` does. Returns (decay to use: the checkpoint's, else ``decay``; updates so far)."""
    names = [n for n, _ in model.named_parameters()]
    torch._foreach_copy_(ema, [state["shadow"][n].to(ema[0].device).float() for n in names])
    return (state["decay"] if state["decay"] is not None else decay), (state["num_updates"] or 0)


def open_wandb(command: str, enabled: bool, project: str, out: Path, config: dict[str, Any]) -> Any:
    """The ``wandb`` module after ``wandb.init`` (one W&B run per run folder, so a resumed run
    continues it), or None when off; a missing ``wandb`` is one line, not a failure. Rank 0 only."""
    if not enabled:
        return None
    try:
        import wandb
    except ImportError:
        print(f"duo-fast {command}: wandb is not installed (pip install 'duo-fast[wandb]'); logging to log.jsonl only")
        return None
    run_id = "duo-" + hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
    wandb.init(project=project, id=run_id, resume="allow", dir=str(out), config=config, name=out.name)
    return wandb
