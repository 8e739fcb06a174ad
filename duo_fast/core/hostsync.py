"""Counting host round trips: the ATen ops through which a value crosses between the host and
the device (``_local_scalar_dense`` and ``item``: a device value read by Python, a wait;
``lift_fresh``: Python data turned into a tensor, a blocking copy to the device and illegal
inside a CUDA-graph capture). On CPU the same ops are dispatched, so a CPU run of the code the
GPU runs shows every such crossing. Used by ``tests/sampling/test_host_sync.py``.

``read_cpu`` is the one sanctioned exception: a read of a CPU tensor by a branch that only CPU
tensors take (there is no device to wait for). It refuses any other tensor, and the counter books
its reads under ``cpu_only`` instead of ``counts``."""

from __future__ import annotations

import collections
import threading
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "HOST_SYNC_OPS", "read_cpu"]

_CPU_READ = threading.local()


def read_cpu(t: torch.Tensor) -> int | float | bool:
    """The Python value of a one-element CPU tensor, for CPU-only branches (a CUDA tensor raises)."""
    if t.device.type != "cpu":
        raise RuntimeError(f"read_cpu is for CPU-only branches; got a tensor on {t.device}")
    _CPU_READ.active = True
    try:
        return t.item()
    finally:
        _CPU_READ.active = False

HOST_SYNC_OPS = frozenset({"aten._local_scalar_dense.default", "aten.item.default", "aten.lift_fresh.default"})


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...``; then ``c.total``, ``c.counts`` (op -> count) and
    ``c.where`` (op -> the innermost duo_fast frames of each occurrence, for messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.cpu_only: collections.Counter[str] = collections.Counter()
        self.where: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in HOST_SYNC_OPS and getattr(_CPU_READ, "active", False):
            self.cpu_only[name] += 1
        elif name in HOST_SYNC_OPS:
            self.counts[name] += 1
            frames = [f for f in traceback.extract_stack()[:-1] if "duo_fast" in f.filename or "/kernels/" in f.filename]
            self.where.append(f"{name} at " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                                        for f in reversed(frames[-4:])))
        return func(*args, **(kwargs or {}))
