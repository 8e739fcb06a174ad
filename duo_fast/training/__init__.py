"""Training and distillation: one harness (``harness``: the run folder, the step loop, signals,
logging, validation, checkpoints, export) with the options every run has (``config``), and the
objectives plugged into it: ``duo`` (the curriculum, then discrete Duo: ``duo-fast train``) and
``dcd`` (consistency distillation: ``duo-fast distill``). Around them: the engines (``engine``:
plain PyTorch and DeepSpeed ZeRO 1-3), resumable checkpoints and signals (``checkpoints``), run
folders (``run_folder``), learning-rate schedules (``lr_schedule``) and the loop's device-side
bookkeeping (``loop_support``).

May import every layer below it: ``duo_fast.core``, ``ops``, ``model``, ``data``, ``io``,
``sampling``, ``eval`` and ``duo_fast.environment``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train", "DistillConfig", "DISTILL_PRESETS", "distill"]

# imported on first use: DeepSpeed and the data stack are heavy
_LAZY = {"TrainConfig": "duo", "TRAIN_PRESETS": "duo", "train": "duo", "DistillConfig": "dcd",
         "DISTILL_PRESETS": "dcd", "distill": "dcd"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"duo_fast.training.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'duo_fast.training' has no attribute {name!r}")
