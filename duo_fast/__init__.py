"""duo_fast: fast, numerically faithful training, distillation and sampling of Duo (uniform-state
discrete diffusion language models, "The Diffusion Duality", ICML 2025).

The public API (everything else lives in its module and may change):

* ``load_pretrained(path_or_hub_id)``: a Duo denoiser from a Hugging Face folder, a hub id or a
  public Lightning ``.ckpt`` (no conversion, no code from the file runs);
* ``generate(model, SamplerConfig(...))``: few-step sampling;
* ``TTable``: the operator T of the duality (docs/math.md section 4);
* the fused operators ``rb_loss``, ``rb_loss_linear``, ``relaxed_embedding``, ``coupled_latents``,
  ``sample_posterior``, ``sample_posterior_linear`` (also as ``duo_fast.ops``);
* ``train(TrainConfig(...))``: the training loop (curriculum, then discrete Duo).

Layout: ``duo_fast.reference`` (the plain-PyTorch math, the oracle of every test),
``duo_fast.ops`` (dispatch), ``duo_fast.kernels`` (Triton), ``duo_fast.model`` (the denoiser),
``duo_fast.cli`` (``duo-fast``). See README.md and docs/.
"""

from __future__ import annotations

from typing import Any

from . import ops
from .ops import coupled_latents, rb_loss, rb_loss_linear, relaxed_embedding, sample_posterior, sample_posterior_linear
from .ttable import TTable

__version__ = "0.1.0"
__all__ = ["load_pretrained", "generate", "SamplerConfig", "TTable", "rb_loss", "rb_loss_linear",
           "relaxed_embedding", "coupled_latents", "sample_posterior", "sample_posterior_linear", "train",
           "TrainConfig", "ops", "__version__"]

# imported on first use: the training stack (DeepSpeed, datasets) and the loaders are heavy
_LAZY = {"load_pretrained": ("pretrained", "load_pretrained"), "generate": ("sampling", "generate"),
         "SamplerConfig": ("sampling", "SamplerConfig"), "train": ("train", "train"),
         "TrainConfig": ("train", "TrainConfig")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'duo_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
