"""The sampling loop captured in a CUDA graph: captured once per model, configuration and shape,
replayed with fresh inputs (the prior, the known tokens, the kernels' seeds) copied into its
static tensors, so a replay launches no Python and draws fresh noise.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from duo_fast.sampling.loop import SamplingLoop

__all__ = ["CapturedLoop", "graph_for"]


class CapturedLoop:
    """A :class:`SamplingLoop` captured in a CUDA graph, with its static input and output tensors
    and the loop's per-step tensors, which every replay reads (owned here, so the caching
    allocator never reuses them while the graph lives)."""

    def __init__(self, loop: SamplingLoop, batch: int, length: int, conditional: bool) -> None:
        import weakref

        dev = loop.device
        self.model_ref = weakref.ref(loop.model)
        self.owned = loop.device_tensors()
        self.z = torch.zeros((batch, length), dtype=torch.int64, device=dev)
        self.seeds = torch.zeros(loop.cfg.steps + 1, dtype=torch.int64, device=dev)
        self.known = torch.zeros((batch, length), dtype=torch.int64, device=dev) if conditional else None
        self.mask = torch.zeros((batch, length), dtype=torch.bool, device=dev) if conditional else None
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):                   # warm-up outside the graph: compiles, cuBLAS handles
            for _ in range(2):
                loop(self.z, self.seeds, known=self.known, mask=self.mask)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = loop(self.z, self.seeds, known=self.known, mask=self.mask)

    def __call__(self, z: Tensor, seeds: Tensor, known: Tensor | None, mask: Tensor | None) -> Tensor:
        self.z.copy_(z)
        self.seeds.copy_(seeds)
        if self.known is not None:
            self.known.copy_(known)
            self.mask.copy_(mask)
        self.graph.replay()
        return self.out.clone()


_GRAPHS: dict[tuple, CapturedLoop] = {}


def graph_for(loop: SamplingLoop, batch: int, length: int, conditional: bool) -> tuple[CapturedLoop, float]:
    """The cached graph of this model, configuration and shape, captured on first use; (graph,
    capture seconds). The key is the frozen configuration itself (``SamplerConfig.graph_key``),
    so every sampler field is part of it."""
    key = (id(loop.model), str(loop.device), length, conditional, loop.fused, loop.cfg.graph_key())
    g = _GRAPHS.get(key)
    if g is not None and g.model_ref() is loop.model:
        return g, 0.0
    t0 = time.perf_counter()
    g = _GRAPHS[key] = CapturedLoop(loop, batch, length, conditional)
    torch.cuda.synchronize(loop.device)
    return g, time.perf_counter() - t0
