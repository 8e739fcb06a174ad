"""duo_fast: fast, numerically faithful training and sampling of Duo (uniform-state discrete
diffusion language models, "The Diffusion Duality", ICML 2025).

Layout: ``duo_fast.reference`` (the plain-PyTorch math, the oracle of every test),
``duo_fast.ttable`` (the operator T), ``duo_fast.model`` (the standard denoiser),
``duo_fast.ops`` (the operators of the training and sampling steps), ``duo_fast.kernels``
(Triton kernels, the repository's ``kernels/`` folder), ``duo_fast.train`` / ``duo_fast.sampling``
(the loops), ``duo_fast.cli`` (``duo-fast``).
"""

from .model import DiT, DiTConfig
from .ttable import TTable

__version__ = "0.1.0"
__all__ = ["DiT", "DiTConfig", "TTable", "__version__"]
