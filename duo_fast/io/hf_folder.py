"""Checkpoints in the public Hugging Face layout (docs/math.md section 7).

A folder with ``config.json`` (``vocab_size``, ``model_length``, ``hidden_dim``, ``cond_dim``,
``n_blocks``, ``n_heads``, ``dropout``, ``time_conditioning``) and ``model.safetensors`` whose
keys are ``backbone.`` + the denoiser's parameter names. duo_fast adds a ``duo_fast`` entry to
``config.json`` (tokenizer, training step) that other readers ignore. Reading is
:func:`duo_fast.pretrained.load_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from duo_fast.model import DiT

__all__ = ["save_hf_folder", "PREFIX"]

PREFIX = "backbone."


def save_hf_folder(model: DiT, path: str | Path, extra: dict[str, Any] | None = None,
                   state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or ``state_dict``, e.g. EMA weights, with the model's names) to ``path``
    as ``config.json`` + ``model.safetensors``, atomically (temporary folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["architectures"] = ["DIT"]
    if extra:
        cfg["duo_fast"] = extra
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path
