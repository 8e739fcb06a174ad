"""The standard denoiser and its configuration."""

from .config import PRESETS, DiTConfig
from .dit import DiT, flash_attention_available

__all__ = ["DiT", "DiTConfig", "PRESETS", "flash_attention_available"]
