"""Checkpoints in the public Hugging Face layout (docs/math.md section 7).

A folder with ``config.json`` (``vocab_size``, ``model_length``, ``hidden_dim``, ``cond_dim``,
``n_blocks``, ``n_heads``, ``dropout``, ``time_conditioning``) and ``model.safetensors`` whose
keys are ``backbone.`` + the denoiser's parameter names. duo_fast adds a ``duo_fast`` entry to
``config.json`` (tokenizer, training step) that other readers ignore. ``save_hf_folder`` writes
one, ``read_hf_folder`` reads its weights and config (``io.pretrained.load_pretrained`` builds the
model from them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from duo_fast.io.state_dict import PREFIX, CheckpointError, load_pickle_checkpoint, strip_prefix
from duo_fast.model import DiT

__all__ = ["save_hf_folder", "read_hf_folder", "PREFIX"]


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


def read_hf_folder(path: Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, list[str]]:
    """(state dict without the prefix, config.json as a dict, format, notes) of a HF folder:
    ``model.safetensors``, else ``pytorch_model.bin`` read without running code."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from e
    st, binf = path / "model.safetensors", path / "pytorch_model.bin"
    if st.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        return strip_prefix(tensors), cfg, "hf-safetensors", []
    if binf.exists():
        obj, notes = load_pickle_checkpoint(binf, trust)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{binf} does not hold a state dict")
        return strip_prefix(obj), cfg, "hf-bin", notes
    raise CheckpointError(f"{path} has neither model.safetensors nor pytorch_model.bin")
