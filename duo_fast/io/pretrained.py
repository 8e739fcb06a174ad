"""Load existing Duo checkpoints with no conversion step and no remote code (docs/math.md section 7).

``load_pretrained(path_or_hub_id)`` reads:

* a Hugging Face folder: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``), keys
  ``backbone.`` + the denoiser's names (the public ``s-sahoo/duo*`` repositories, and the
  ``export/`` folder of ``duo-fast train``);
* a hub id, fetched with ``huggingface_hub.snapshot_download`` where the network allows;
* a PyTorch Lightning ``.ckpt`` of the public training code: ``state_dict`` (``backbone.*``, other
  prefixes such as ``teacher.`` ignored) and ``ema.shadow_params``, a list in the order of the
  backbone's parameters (buffers left out), used by default.

Pickles (``.ckpt``, ``.bin``) are read with ``torch.load(weights_only=True)``. A Lightning
checkpoint whose metadata holds other classes is read by a restricted unpickler that keeps
tensors and plain containers and drops everything else; arbitrary unpickling needs
``trust_checkpoint=True``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from duo_fast.io.hf_folder import read_hf_folder
from duo_fast.io.lightning_ckpt import check_sizes, read_lightning_ckpt, tokenizer_from_record
from duo_fast.io.state_dict import (
    CheckpointError,
    check_and_load,
    config_from_state_dict,
    load_pickle_checkpoint,
    preset_name,
)
from duo_fast.model import DiT

__all__ = ["load_pretrained", "PretrainedInfo", "CheckpointError", "load_pickle_checkpoint", "config_from_state_dict",
           "describe"]


@dataclass
class PretrainedInfo:
    source: str
    format: str                      # "hf-safetensors", "hf-bin", "lightning"
    vocab_size: int
    length: int
    preset: str                      # tiny / small / medium, or "custom"
    weights: str                     # "ema" or "raw"
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)      # config.json's "duo_fast" entry (tokenizer, step)
    notes: list[str] = field(default_factory=list)
    algo: str | None = None          # a Lightning checkpoint's algo.name (duo, duo_base, distillation, ...)
    tokenizer: Any = None            # the tokenizer pickled in a Lightning checkpoint, rebuilt as data
    # a Lightning checkpoint's EMA: {"decay", "num_updates", "shadow": {parameter name: tensor (CPU)}}
    ema_state: dict[str, Any] | None = None


def load_pretrained(path_or_hub_id: str | Path, ema: bool = True, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, trust_checkpoint: bool = False) -> tuple[DiT, PretrainedInfo]:
    """Load a Duo denoiser from a HF folder, a hub id or a Lightning ``.ckpt``.

    Returns ``(model in eval mode on device, info)``. ``ema=False`` takes the raw weights of a
    Lightning checkpoint (HF folders hold one set of weights). ``dtype`` casts the floating
    parameters (default: keep float32, as the public model, with bf16 autocast on CUDA).
    """
    src = str(path_or_hub_id)
    path = Path(src)
    notes: list[str] = []
    if path.is_dir():
        sd, cfg, fmt, notes = read_hf_folder(path, trust_checkpoint)
        weights = "ema" if cfg.get("duo_fast", {}).get("weights", "ema") == "ema" else "raw"
    elif path.is_file():
        sd, cfg, fmt, notes, weights = read_lightning_ckpt(path, ema, trust_checkpoint)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(src, allow_patterns=["config.json", "*.safetensors", "*.bin", "tokenizer*"])
        except Exception as e:  # noqa: BLE001 - offline, missing repo, ...
            raise CheckpointError(f"could not fetch {src!r} from the Hugging Face hub ({type(e).__name__}: {e})") from e
        return load_pretrained(local, ema=ema, device=device, dtype=dtype, trust_checkpoint=trust_checkpoint)
    else:
        raise CheckpointError(f"{src!r} is neither a checkpoint folder, a .ckpt file nor a hub id")
    lightning = cfg.pop("_lightning", None) if fmt == "lightning" else None
    ema_state = cfg.pop("_ema", None) if fmt == "lightning" else None
    config = config_from_state_dict(sd, cfg)
    if lightning is not None:
        check_sizes(config, lightning["model"], src)
    with torch.device("meta"):
        model = DiT(config)
    model = model.to_empty(device="cpu")
    check_and_load(model, sd, src)
    model = model.to(device=device, dtype=dtype).eval() if dtype is not None else model.to(device).eval()
    info = PretrainedInfo(source=src, format=fmt, vocab_size=config.vocab_size, length=config.model_length,
                          preset=preset_name(config), weights=weights, config=config.to_dict(),
                          extra=dict(cfg.get("duo_fast") or {}), notes=notes,
                          algo=lightning["algo"] if lightning else None,
                          tokenizer=tokenizer_from_record(lightning["tokenizer"]) if lightning else None,
                          ema_state=ema_state)
    return model, info


def describe(info: PretrainedInfo) -> str:
    return (f"{info.source}: {info.format}, {info.preset} (K={info.vocab_size}, L={info.length}), "
            f"{info.weights} weights" + (f"; {'; '.join(info.notes)}" if info.notes else ""))
