"""Devices: resolving ``--device`` and the peak figures of known GPUs. A low module every
command and the bench use (it imports nothing of duo_fast)."""

from __future__ import annotations

import re

import torch

__all__ = ["resolve_device", "device_peaks", "DEVICE_PEAKS"]

# (name fragment, dense bf16 tensor FLOP/s, HBM bytes/s): vendor data-sheet figures
DEVICE_PEAKS = [("H200", 989e12, 4.8e12), ("H100", 989e12, 3.35e12), ("A100", 312e12, 2.0e12)]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; ``ValueError`` (one line)
    for anything else, or for CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was asked for, but torch sees no CUDA device on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"there are {torch.cuda.device_count()} CUDA devices; {name} does not exist")
    return dev


def device_peaks(device: torch.device) -> tuple[float, float] | None:
    """(bf16 tensor FLOP/s, bytes/s) of a known GPU, else None (CPUs, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((f, bw) for key, f, bw in DEVICE_PEAKS if key in name), None)
