"""What duo_fast will run on this machine: versions, the device, and which implementation each
operator takes and why (as ``duo_fast.ops.backends`` decides it). ``duo-fast env`` prints it;
its dict is stored in every run's ``summary.json`` and every bench JSON."""

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


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device, backends (op -> {"backend", "why"}) and cache locations."""
    from duo_fast.core.devices import resolve_device

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
    from duo_fast.ops.backends import report

    info["backends"] = {op: {"backend": c.impl, "why": c.why} for op, c in report(dev).items()}
    from duo_fast.ops import extension as _ext

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
