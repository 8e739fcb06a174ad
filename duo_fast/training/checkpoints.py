"""Resumable runs: atomic checkpoints, the newest complete one, signals, and collectives the
loops share (``train`` and ``distill``).

A checkpoint after step ``s`` is the folder ``ROOT/step{s:09d}``: the engine's shards (every rank
writes its own), ``rank{r}.pt`` (each rank's RNG states and data position) and ``state.pt`` (the
loop's shared state, from rank 0). It is assembled in ``ROOT/.tmp-step...``, every file fsynced,
marked ``COMPLETE``, fsynced and renamed only when every rank has written its part; then all but
the newest ``keep`` complete checkpoints are deleted. So a crash at any moment leaves the previous
complete checkpoints loadable.

Reading never runs code from the folder: ``state.pt`` and ``rank{r}.pt`` hold only tensors and
plain data and are read with ``weights_only=True``; the engine's files are first read by
:mod:`duo_fast.io.safe_pickle` (which refuses code-running globals unrun) before DeepSpeed loads
them. :func:`load_newest` falls back to the previous complete checkpoint when the newest cannot
be read (the ranks agree), moving the bad one aside to ``ROOT/corrupt-step...``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from duo_fast.training.engine import barrier

__all__ = ["write_checkpoint", "read_checkpoint", "latest_checkpoint", "complete_checkpoints", "load_newest",
           "CheckpointReadError", "StopFlag", "mean_over_ranks", "gather_ints", "generator_states",
           "set_generator_states", "read_plain"]


class CheckpointReadError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, garbage, or holding code)."""


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, step: int, engine: Any, rank: int, shared: dict[str, Any],
                     rank_state: dict[str, Any], keep: int = 2) -> Path:
    """A collective: every rank calls it with its own ``rank_state``; ``shared`` is written by rank 0.
    Keeps the newest ``keep`` complete checkpoints."""
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
        _fsync_tree(tmp)
        (tmp / "COMPLETE").write_text(str(step))
        _fsync_tree(tmp)
        if final.exists():                      # the same step again (a resumed run re-saving it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_plain(path: Path) -> Any:
    """A file of tensors and plain data, read with ``weights_only=True``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointReadError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def _verify_engine_files(path: Path, rank: int) -> None:
    """Read every pickle the engine will load (``engine.pt``, DeepSpeed's shards) with the inert
    unpickler first: a file that names a code-running global is refused before DeepSpeed's own
    ``torch.load`` sees it."""
    from duo_fast.io import safe_pickle

    for f in sorted(path.rglob("*.pt")):
        if f.name == "state.pt" or f.name.startswith("rank"):
            continue
        try:
            safe_pickle.load(f)
        except Exception as e:  # noqa: BLE001 - any failure: the file is not usable
            raise CheckpointReadError(f"{f} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def read_checkpoint(path: Path, engine: Any, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared state, this rank's state), with the engine restored from ``path``."""
    shared = read_plain(path / "state.pt")
    mine = read_plain(path / f"rank{rank}.pt")
    _verify_engine_files(path, rank)
    try:
        engine.load(path)
    except (pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointReadError(f"{path}: the engine state cannot be read ({type(e).__name__}: {e})") from e
    except RuntimeError as e:
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            raise ValueError(f"checkpoint {path} holds a model of another shape: {str(e).splitlines()[0]}") from e
        raise CheckpointReadError(f"{path}: the engine state cannot be read ({str(e).splitlines()[0][:200]})") from e
    return shared, mine


def complete_checkpoints(root: Path) -> list[Path]:
    """Every complete checkpoint under ``root``, oldest first (half-written ones are never renamed)."""
    return sorted(p for p in root.glob("step*") if (p / "COMPLETE").exists())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def load_newest(root: Path, load: Callable[[Path], Any], rank: int) -> tuple[Path, Any] | None:
    """``load(path)`` on the newest complete checkpoint that every rank can read; one that some
    rank cannot read is named, moved aside to ``ROOT/corrupt-step...`` and the previous one tried.
    None when there is no checkpoint (or none readable: then the error of the oldest is raised)."""
    from duo_fast.training.loop_support import agreed_stop

    last_error: CheckpointReadError | None = None
    for path in reversed(complete_checkpoints(root)):
        try:
            result, failed = load(path), False
        except CheckpointReadError as e:
            result, failed, last_error = None, True, e
            print(f"duo-fast: checkpoint {path.name} is unusable: {e}; trying the previous one", flush=True)
        if not agreed_stop(failed):
            return path, result
        barrier()
        if rank == 0 and path.exists():
            os.replace(path, path.with_name(f"corrupt-{path.name}"))
        barrier()
    if last_error is not None:
        raise last_error
    return None


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
    """SIGTERM/SIGINT set a flag; the loop writes a checkpoint at the end of the step and exits
    (every rank at the same step: the loops OR the flag over ranks, ``steploop.agreed_stop``).
    ``DUO_FAST_TEST_SIGNAL_AT_STEP`` (tests) sends this process SIGTERM after that step; with
    ``DUO_FAST_TEST_SIGNAL_RANK`` only that rank gets it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        at = os.environ.get("DUO_FAST_TEST_SIGNAL_AT_STEP")
        only = os.environ.get("DUO_FAST_TEST_SIGNAL_RANK")
        if only is not None and only != os.environ.get("RANK", "0"):
            at = None
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
