"""Resumable runs: atomic checkpoints, the newest complete one, signals, and collectives the
loops share (``train`` and ``distill``).

A checkpoint after step ``s`` is the folder ``ROOT/step{s:09d}``: the engine's shards (every rank
writes its own), ``rank{r}.pt`` (each rank's RNG states and data position) and ``state.pt`` (the
loop's shared state, from rank 0). It is assembled in ``ROOT/.tmp-step...``, marked ``COMPLETE``
and renamed only when every rank has written its part; older checkpoints are deleted after that.
So a crash at any moment leaves the previous complete checkpoint loadable.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from .engine import barrier

__all__ = ["write_checkpoint", "read_checkpoint", "latest_checkpoint", "StopFlag", "mean_over_ranks",
           "gather_ints", "generator_states", "set_generator_states"]


def write_checkpoint(root: Path, step: int, engine: Any, rank: int, shared: dict[str, Any],
                     rank_state: dict[str, Any]) -> Path:
    """A collective: every rank calls it with its own ``rank_state``; ``shared`` is written by rank 0."""
    final, tmp = root / f"step{step:09d}", root / f".tmp-step{step:09d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)
    torch.save(rank_state, tmp / f"rank{rank}.pt")
    if rank == 0:
        torch.save(shared, tmp / "state.pt")
    barrier()
    if os.environ.get("DUO_FAST_TEST_DIE_IN_SAVE") == str(step):      # tests: a crash mid-save
        os._exit(17)
    if rank == 0:
        (tmp / "COMPLETE").write_text(str(step))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("step*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_checkpoint(path: Path, engine: Any, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared state, this rank's state), with the engine restored from ``path``."""
    shared = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    engine.load(path)
    mine = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    return shared, mine


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (half-written ones are never renamed)."""
    done = sorted(p for p in root.glob("step*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def generator_states(gens: dict[str, torch.Generator], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {k: g.get_state() for k, g in gens.items()}
    out["torch"] = torch.get_rng_state()
    out["cuda"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return out


def set_generator_states(gens: dict[str, torch.Generator], state: dict[str, Any], device: torch.device) -> None:
    for k, g in gens.items():
        g.set_state(state[k])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop writes a checkpoint at the end of the step and exits.
    ``DUO_FAST_TEST_SIGNAL_AT_STEP`` (tests) sends this process SIGTERM after that step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        at = os.environ.get("DUO_FAST_TEST_SIGNAL_AT_STEP")
        self._test_at = int(at) if at is not None else None

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def after_step(self, step: int) -> bool:
        """True when the loop must checkpoint and exit now."""
        if self._test_at is not None and step == self._test_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [values]
    t = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]
