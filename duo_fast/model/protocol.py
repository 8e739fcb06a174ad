"""What the rest of duo_fast uses of a denoiser: the small :class:`Denoiser` protocol. The
standard DiT (``model.dit``) implements it; a new denoiser that does is usable by the samplers,
the losses, the trainer and the checkpoint readers (docs/architecture.md, "Adding a denoiser").
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["Denoiser"]


@runtime_checkable
class Denoiser(Protocol):
    """A denoiser ``x_theta(z_t, sigma)``.

    * ``config``: its sizes (``vocab_size``, ``model_length``, ``hidden_dim``, ...; a ``DiTConfig``
      for the standard model), what the checkpoint readers and writers store;
    * ``vocab_embed.embedding``: the (K, D) input embedding that the curriculum's relaxation reads;
    * ``__call__(x, sigma, *, inputs_embeds=None, return_hidden=False)``: the logits (B, L, K) of
      token ids / relaxed weights ``x`` (or of ``inputs_embeds`` (B, L, D)) at ``sigma`` (B,), or
      with ``return_hidden`` the hidden state (B, L, D) that :meth:`output_projection` maps to them;
    * ``output_projection()``: that last ``nn.Linear`` (K x D weight, K bias), which the fused
      loss and the fused sampler apply themselves.
    """

    config: Any
    vocab_embed: Any

    def __call__(self, x: Any, sigma: Tensor, *, inputs_embeds: Tensor | None = None,
                 return_hidden: bool = False) -> Tensor: ...

    def output_projection(self) -> nn.Linear: ...
