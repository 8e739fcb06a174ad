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

Layout (docs/architecture.md), lowest layer first: ``kernels`` (Triton), ``core`` (devices, noise
schedules, draws, seeds), ``ops`` (the operators and the backend registry), ``model`` (the
denoiser), ``data``, ``io`` (HF folders, ``.ckpt`` files), ``sampling``, ``eval``, ``training``,
``tools`` (cost model, compile check), ``bench``, ``cli`` (``duo-fast``); ``reference`` is the
plain-PyTorch oracle of the tests, imported by no production module.
"""

from __future__ import annotations

from typing import Any

from duo_fast import ops
from duo_fast.ops import coupled_latents, rb_loss, rb_loss_linear, relaxed_embedding, sample_posterior, sample_posterior_linear
from duo_fast.ops.ttable import TTable

__version__ = "0.1.0"
__all__ = ["load_pretrained", "generate", "SamplerConfig", "TTable", "rb_loss", "rb_loss_linear",
           "relaxed_embedding", "coupled_latents", "sample_posterior", "sample_posterior_linear", "train",
           "TrainConfig", "ops", "__version__"]

# imported on first use: the training stack (DeepSpeed, datasets) and the loaders are heavy
_LAZY = {"load_pretrained": ("io.pretrained", "load_pretrained"), "generate": ("sampling", "generate"),
         "SamplerConfig": ("sampling", "SamplerConfig"), "train": ("training", "train"),
         "TrainConfig": ("training", "TrainConfig")}


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
