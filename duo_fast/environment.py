"""What duo_fast will run on this machine: versions, the device, and which implementation each
operator takes and why. ``duo-fast env`` prints it; its dict is stored in every run's
``summary.json`` and every bench JSON."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "print_environment"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ttable_backend(device: torch.device) -> tuple[str, str]:
    from . import _ext
    from .ttable import lookup_backend

    forced = os.environ.get("DUO_FAST_TTABLE_IMPL")
    try:
        choice = lookup_backend(device)
    except (RuntimeError, ValueError) as e:
        return "error", str(e)
    if choice == "torch":
        why = f"DUO_FAST_TTABLE_IMPL={forced}" if forced == "torch" else \
            f"the C++ op is unavailable ({str(_ext.IMPORT_ERROR).splitlines()[0][:160] if _ext.IMPORT_ERROR else '?'})"
        return "torch", why
    why = {"prebuilt": "C++ op prebuilt at install (duo_fast._C)",
           "jit": f"C++ op compiled on first use, cached in {_ext.jit_build_dir()}"}.get(_ext.SOURCE, _ext.SOURCE)
    return "cpp", why


def _fused_backend(device: torch.device) -> tuple[str, str]:
    from .ops._dispatch import use_triton

    forced = os.environ.get("DUO_FAST_IMPL", "auto")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        triton_ok = use_triton(torch.empty(0, device=device))
    except RuntimeError as e:
        return "error", str(e)
    if forced == "torch":
        return "torch", "DUO_FAST_IMPL=torch"
    if triton_ok:
        return ("triton-interpreter", "TRITON_INTERPRET=1: the Triton kernels run as Python on CPU tensors") \
            if device.type == "cpu" else ("triton", f"Triton kernels on {device}")
    return "torch", ("chunked PyTorch path: Triton kernels need CUDA tensors" if not interpret else "forced")


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device, backends (op -> {"backend", "why"}) and cache locations."""
    from .devices import resolve_device

    dev = resolve_device("auto") if device is None else torch.device(device)
    info: dict[str, Any] = {
        "versions": {"python": platform.python_version(), "duo_fast": _version("duo_fast"), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "triton": _version("triton"), "deepspeed": _version("deepspeed"),
                     "flash_attn": _version("flash-attn") or _version("flash_attn"), "numpy": _version("numpy"),
                     "transformers": _version("transformers")},
        "device": {"name": str(dev), "cpu": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads()},
    }
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        info["device"].update(gpu=torch.cuda.get_device_name(dev), capability=f"sm_{major}{minor}")
    ttable, ttable_why = _ttable_backend(dev)
    fused, fused_why = _fused_backend(dev)
    from .model.dit import flash_attention_available

    attention = ("flash-attn" if flash_attention_available() and dev.type == "cuda" else "torch sdpa",
                 "flash-attn installed, bf16 on CUDA" if flash_attention_available() and dev.type == "cuda"
                 else "torch.nn.functional.scaled_dot_product_attention")
    info["backends"] = {
        "ttable_lookup": {"backend": ttable, "why": ttable_why},
        **{op: {"backend": fused, "why": fused_why} for op in ("rb_loss", "rb_loss_linear", "relaxed_embedding",
                                                              "sample_posterior", "sample_posterior_linear")},
        "coupled_latents": {"backend": "torch", "why": "O(1) per token: plain PyTorch on any device"},
        "attention": {"backend": attention[0], "why": attention[1]},
    }
    from . import _ext

    cache = Path(os.environ.get("DUO_FAST_CACHE", Path.home() / ".cache" / "duo_fast"))
    info["caches"] = {"duo_fast": str(cache), "cpp_op_jit": str(_ext.jit_build_dir()),
                      "triton": os.environ.get("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache")),
                      "huggingface": os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))}
    return info


def print_environment(info: dict[str, Any]) -> None:
    v = info["versions"]
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
          + ("; not installed: " + ", ".join(k for k, val in v.items() if val is None) if None in v.values() else ""))
    d = info["device"]
    print(f"device: {d['name']}" + (f" ({d['gpu']}, {d['capability']})" if "gpu" in d else f" ({d['cpu']}, "
                                                                                         f"{d['threads']} threads)"))
    print("backends:")
    for op, b in info["backends"].items():
        print(f"  {op:24s} {b['backend']:20s} {b['why']}")
    print("caches:")
    for k, path in info["caches"].items():
        print(f"  {k:12s} {path}")
