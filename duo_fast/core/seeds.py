"""The randomness of a micro-batch as a function of ``(seed, step, slot)``.

``slot = micro_step * world + rank`` (the same slot as its data: ``BlockOrder`` gives rank ``r``
the ``r``-th slice of each global micro-batch). So a run on one process with accumulation draws
exactly what the same run on several ranks draws, a restart needs no generator state, and no
step draws a seed through a tensor. Validation uses ``step = -1``: the same stream at every call.
"""

from __future__ import annotations

__all__ = ["micro_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def micro_seed(seed: int, step: int, slot: int, stream: int = 0) -> int:
    """A 62-bit seed of micro-batch ``slot`` of optimizer step ``step`` (pure Python)."""
    h = _splitmix64(seed & _MASK64)
    for v in (step, slot, stream):
        h = _splitmix64(h ^ (v & _MASK64))
    return h & ((1 << 62) - 1)
