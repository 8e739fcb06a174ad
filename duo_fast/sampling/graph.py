"""The sampling loop captured in a CUDA graph: captured once per model, configuration and shape,
replayed with fresh inputs (the prior, the known tokens, the kernels' seeds) copied into its
static tensors, so a replay launches no Python and draws fresh noise.

A replay reads fixed addresses, so the graph owns every tensor it reads: its static inputs and
output, and the loop's per-step tensors (``SamplingLoop.device_tensors``:
``tests/sampling/test_graph_ownership.py`` checks on CPU that a loop reads nothing else but the
model's own tensors). The model is held weakly; its weights' addresses are part of the key. The
cache keeps at most :data:`MAX_GRAPHS` graphs; :func:`clear_graphs` frees them all.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch
from torch import Tensor

from duo_fast.sampling.loop import SamplingLoop

__all__ = ["CapturedLoop", "graph_for", "graph_key", "clear_graphs", "MAX_GRAPHS"]


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


# captured graphs, least recently used first; each holds a private memory pool, so the cache is bounded
_GRAPHS: OrderedDict[tuple, CapturedLoop] = OrderedDict()
MAX_GRAPHS = 8


def _weights_key(model: torch.nn.Module) -> tuple[int, ...]:
    """The addresses of the model's parameters and buffers: the graph replays them, so a model
    whose weights moved (``.to()``, a new dtype) must not reuse it."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def graph_key(loop: SamplingLoop, length: int, conditional: bool) -> tuple:
    """What a captured graph depends on: the model (identity and weight addresses), the device,
    the shape, the conditioning, the fused path and the frozen configuration without its seed
    (``SamplerConfig.graph_key``: every sampler field, present and future)."""
    return (id(loop.model), _weights_key(loop.model), str(loop.device), length, conditional, loop.fused,
            loop.cfg.graph_key())


def clear_graphs() -> int:
    """Drop every captured sampling graph (and its memory pool); returns how many there were."""
    n = len(_GRAPHS)
    _GRAPHS.clear()
    return n


def graph_for(loop: SamplingLoop, batch: int, length: int, conditional: bool) -> tuple[CapturedLoop, float]:
    """The cached graph of this model, configuration and shape, captured on first use; (graph,
    capture seconds). At most :data:`MAX_GRAPHS` stay cached (least recently used dropped first),
    and graphs of models that no longer exist are dropped."""
    for k in [k for k, g in _GRAPHS.items() if g.model_ref() is None]:
        del _GRAPHS[k]
    key = graph_key(loop, length, conditional)
    g = _GRAPHS.get(key)
    if g is not None and g.model_ref() is loop.model:
        _GRAPHS.move_to_end(key)
        return g, 0.0
    t0 = time.perf_counter()
    g = _GRAPHS[key] = CapturedLoop(loop, batch, length, conditional)
    while len(_GRAPHS) > MAX_GRAPHS:
        _GRAPHS.popitem(last=False)
    torch.cuda.synchronize(loop.device)
    return g, time.perf_counter() - t0
