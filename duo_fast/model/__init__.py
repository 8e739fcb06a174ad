"""The denoiser: the standard DiT (``dit``), its sizes and presets (``config``) and the small
``Denoiser`` protocol every denoiser implements (``protocol``: what the samplers, the losses and
the checkpoint readers use of it).

May import: ``duo_fast.core``, ``duo_fast.ops``.
"""

from duo_fast.model.config import PRESETS, DiTConfig
from duo_fast.model.dit import DiT, flash_attention_available
from duo_fast.model.protocol import Denoiser

__all__ = ["DiT", "DiTConfig", "Denoiser", "PRESETS", "flash_attention_available"]
