"""The T-table custom op ``torch.ops.duo_fast.ttable_lookup`` (csrc/) and what the Python side
adds to it.

The op comes from, in order:

1. ``prebuilt``: the extension ``duo_fast._C`` that ``setup.py`` builds when torch is importable
   at build time (``pip install --no-build-isolation``);
2. ``jit``: otherwise (``pip install .`` with build isolation, where torch is not visible) the
   sources installed as ``duo_fast.csrc`` are compiled on first use with
   ``torch.utils.cpp_extension.load`` (one line says so), cached per torch version and device
   (``$DUO_FAST_CACHE/torch_extensions/...``); later imports load the cached library;
3. ``fallback``: with no compiler (or ``DUO_FAST_NO_JIT=1``) the pure-PyTorch lookup, with one
   warning saying why. Same results, slower.

Here we add the op's fake (meta) implementation, so ``torch.compile`` traces through it, and its
autograd formula (``d alpha / d gamma`` is the op's second output).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["AVAILABLE", "SOURCE", "IMPORT_ERROR", "warn_fallback_once", "jit_build_dir", "build_jit"]

IMPORT_ERROR: Exception | None = None
SOURCE = "fallback"          # "prebuilt", "jit" or "fallback"


def jit_build_dir() -> Path:
    """Where the JIT build of the op is cached: per torch version and device capability."""
    root = Path(os.environ.get("DUO_FAST_CACHE", Path.home() / ".cache" / "duo_fast"))
    tag = f"torch{torch.__version__.replace('+', '_')}"
    if torch.cuda.is_available() and torch.version.cuda:
        major, minor = torch.cuda.get_device_capability()
        tag += f"-cuda{torch.version.cuda}-sm{major}{minor}"
    else:
        tag += "-cpu"
    return root / "torch_extensions" / tag


def _sources() -> tuple[list[str], bool]:
    """(source files, with CUDA) of the installed ``duo_fast.csrc`` package."""
    import importlib.util

    spec = importlib.util.find_spec("duo_fast.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the C++ sources (duo_fast.csrc) are not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    from torch.utils.cpp_extension import CUDA_HOME

    cuda = bool(torch.cuda.is_available() and torch.version.cuda and CUDA_HOME)
    names = ["ttable_lookup_cpu.cpp", "rb_loss_cpu.cpp"]
    names += ["ttable_lookup_cuda.cpp", "ttable_lookup_kernel.cu"] if cuda else []
    files = [folder / n for n in names]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"C++ sources missing: {missing}")
    return [str(f) for f in files], cuda


def build_jit(verbose: bool = False) -> Path:
    """Compile (or load the cached build of) the op from the installed sources; registers it."""
    from torch.utils.cpp_extension import load

    sources, cuda = _sources()
    build = jit_build_dir()
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print(f"duo_fast: compiling the C++ T-table op for torch {torch.__version__}{' with CUDA' if cuda else ''} "
              f"(first use; cached in {build})", file=sys.stderr, flush=True)
    load(name="duo_fast_ttable", sources=sources, build_directory=str(build), is_python_module=False,
         extra_cflags=["-O3", "-std=c++17", "-fopenmp"], extra_ldflags=["-fopenmp"],
         extra_cuda_cflags=["-O3", "-std=c++17"], verbose=verbose)
    return build


try:
    from duo_fast import _C  # noqa: F401  (registers the ops)

    AVAILABLE = hasattr(torch.ops.duo_fast, "ttable_lookup")
    SOURCE = "prebuilt" if AVAILABLE else "fallback"
except ImportError as e:  # not prebuilt (installed with build isolation, or DUO_FAST_SKIP_EXT=1)
    AVAILABLE, IMPORT_ERROR = False, e
    if os.environ.get("DUO_FAST_NO_JIT") != "1":
        try:
            build_jit()
            AVAILABLE = hasattr(torch.ops.duo_fast, "ttable_lookup")
            SOURCE = "jit" if AVAILABLE else "fallback"
        except Exception as jit_error:  # noqa: BLE001 - no compiler, no ninja, no sources: the fallback, said once
            IMPORT_ERROR = jit_error

if AVAILABLE:

    @torch.library.register_fake("duo_fast::ttable_lookup")
    def _ttable_lookup_fake(gamma, q, dq, gamma_min, gamma_max, vocab_size):
        return gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _backward(ctx, grad_alpha, grad_dalpha):
        # dalpha/dgamma is returned as a constant: its own derivative is not provided.
        (dalpha,) = ctx.saved_tensors
        return grad_alpha * dalpha, None, None, None, None, None

    torch.library.register_autograd("duo_fast::ttable_lookup", _backward, setup_context=_setup_context)

_warned = False


def warn_fallback_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        why = str(IMPORT_ERROR).splitlines()[0][:300] if IMPORT_ERROR else "DUO_FAST_NO_JIT=1"
        warnings.warn(f"duo_fast: the C++ T-table op is neither prebuilt nor compilable here ({why}); using the "
                      "pure-PyTorch lookup (same results, slower). A C++ compiler and ninja let it build on first use.",
                      RuntimeWarning, stacklevel=3)
