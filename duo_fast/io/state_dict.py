"""What every checkpoint format shares: the error for an unusable checkpoint, reading a pickle
without running code, the denoiser's sizes from its weights, and loading a state dict whose keys
are checked first.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from duo_fast.model import PRESETS, DiT, DiTConfig

__all__ = ["PREFIX", "CheckpointError", "load_pickle_checkpoint", "config_from_state_dict", "preset_name",
           "check_and_load", "strip_prefix"]

PREFIX = "backbone."     # the public checkpoints' prefix of the denoiser's parameter names


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason."""



def load_pickle_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> tuple[Any, list[str]]:
    """``torch.load`` a pickle without running code from it. Returns ``(object, notes)``: tries
    ``weights_only=True``, then :mod:`duo_fast.io.safe_pickle` (objects of other classes, such as
    the OmegaConf config and tokenizer of a Lightning checkpoint, become inert records);
    ``trust_checkpoint=True`` allows arbitrary code, as plain ``torch.load`` would."""
    from duo_fast.io import safe_pickle

    path = Path(path)
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False), ["loaded with arbitrary unpickling (trusted)"]
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as e:
        first_error = e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    try:
        obj, classes = safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as e:
        raise CheckpointError(f"{path}: {e}; pass --trust-checkpoint / trust_checkpoint=True only if you trust "
                              "the file") from e
    except Exception as e:  # noqa: BLE001 - any other failure here is a corrupt file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
                              f"weights_only said: {first_error}") from e
    return obj, [f"metadata objects read as inert records: {', '.join(classes)}"] if classes else []


def config_from_state_dict(sd: dict[str, torch.Tensor], base: dict[str, Any] | None = None) -> DiTConfig:
    """The denoiser's sizes from the weights (vocabulary, width, depth, heads via the rotary
    table, conditioning width); ``base`` (a config.json dict) supplies length, dropout, etc."""
    if "vocab_embed.embedding" not in sd:
        raise CheckpointError(f"no '{PREFIX}vocab_embed.embedding' in the weights; is this a Duo/MDLM DiT checkpoint?")
    K, D = sd["vocab_embed.embedding"].shape
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    cfg = dict(base or {})
    cfg.update(vocab_size=int(K), hidden_dim=int(D), n_blocks=len(blocks))
    if "sigma_map.mlp.0.weight" in sd:
        cfg["cond_dim"] = int(sd["sigma_map.mlp.0.weight"].shape[0])
    if "rotary_emb.inv_freq" in sd:
        cfg["n_heads"] = int(D // (2 * sd["rotary_emb.inv_freq"].shape[0]))
    elif "n_heads" not in cfg:
        raise CheckpointError("cannot tell the number of heads: no rotary_emb.inv_freq and no config")
    try:
        return DiTConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"inconsistent model sizes {cfg}: {e}") from e


def preset_name(cfg: DiTConfig) -> str:
    for name, p in PRESETS.items():
        if all(getattr(cfg, k) == v for k, v in p.items()):
            return name
    return "custom"


def check_and_load(model: DiT, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the denoiser; missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: '{PREFIX}{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True)


def strip_prefix(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX) and isinstance(v, torch.Tensor)}
