"""Few-step sampling of a Duo denoiser: the configuration (``config``), the Psi schedules
(``psi``), the per-step draws behind one step interface (``steps``: posterior, Psi, nucleus and
the final step), conditioning (``conditioning``: prompts, infill templates), the loop and its
CUDA graph (``loop``, ``graph``).

May import: ``duo_fast.core``, ``duo_fast.ops``, ``duo_fast.model``.
"""

from duo_fast.sampling.config import SamplerConfig
from duo_fast.sampling.loop import generate

__all__ = ["SamplerConfig", "generate"]
