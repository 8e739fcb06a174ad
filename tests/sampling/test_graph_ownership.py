"""A captured sampling graph replays fixed addresses, so it must own every tensor its replay
reads. On CPU: run the loop eagerly, on the PyTorch path and on the Triton path the GPU runs
(under the interpreter), record every tensor an op or a kernel reads, and check that each one is
the loop's input, a tensor the loop made, one of the loop's ``device_tensors()`` (which
``CapturedLoop`` keeps) or the model's own; then that the graph cache is bounded and keyed by
the weights' addresses."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from duo_fast.model import DiT, DiTConfig
from duo_fast.sampling import SamplerConfig
from duo_fast.sampling import graph as graph_mod
from duo_fast.sampling.loop import SamplingLoop
from duo_fast.sampling.psi import PSI_PRESETS


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Reads(TorchDispatchMode):
    """Storages read by aten ops before any op of the run produced them."""

    def __init__(self) -> None:
        super().__init__()
        self.made: set[int] = set()
        self.external: set[int] = set()

    def note_reads(self, values) -> None:
        for t in tree_flatten(values)[0]:
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in self.made:
                self.external.add(_storage(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.note_reads((args, kwargs))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel():
                self.made.add(_storage(t))
        return out


def _model_tensors(model: torch.nn.Module) -> set[int]:
    """Storages the model owns: parameters, buffers and tensors cached on its modules."""
    found = {_storage(t) for t in (*model.parameters(), *model.buffers())}
    for m in model.modules():
        for v in vars(m).values():
            for t in tree_flatten(v)[0] if isinstance(v, (dict, list, tuple)) else [v]:
                if isinstance(t, torch.Tensor):
                    found.add(_storage(t))
    return found


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("sampler", ["plain", "psi", "nucleus", "conditional"])
def test_a_loop_reads_only_what_a_captured_graph_owns(monkeypatch, impl, sampler):
    if impl == "triton" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path runs on CPU only under the interpreter")
    monkeypatch.setenv("DUO_FAST_IMPL", impl)
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("tiny", vocab_size=61, model_length=12, hidden_dim=64, n_blocks=1, n_heads=2,
                                    cond_dim=32)).eval()
    extra = {"psi": {"psi": PSI_PRESETS["duo-loop-remdm"]["psi"]}, "nucleus": {"top_p": 0.9}}.get(sampler, {})
    cfg = SamplerConfig(steps=3, batch=2, length=12, noise_removal="greedy", **extra)
    loop = SamplingLoop(model, cfg, torch.device("cpu"), None, torch.Generator().manual_seed(1))
    z = torch.randint(0, 61, (2, 12))
    seeds = torch.randint(0, 2**62, (cfg.steps + 1,))
    known = mask = None
    if sampler == "conditional":
        known, mask = torch.randint(0, 61, (2, 12)), torch.rand(2, 12) < 0.3
    rec = _Reads()

    # the Triton launches read their tensor arguments directly (the interpreter): count them as reads
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        rec.note_reads((args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    with torch.no_grad(), rec:
        loop(z, seeds, known=known, mask=mask)
    allowed = {_storage(t) for t in (z, seeds, *(t for t in (known, mask) if t is not None))}
    allowed |= {_storage(t) for t in loop.device_tensors() if t is not None}
    allowed |= _model_tensors(model)
    stray = rec.external - allowed
    assert not stray, f"the loop reads {len(stray)} tensor(s) that a captured graph would not own"


def test_the_graph_cache_is_bounded_and_follows_the_weights(monkeypatch):
    """graph_for on CPU cannot capture; its key and bound are checked with a stand-in capture."""
    made = []

    class FakeCapture:
        def __init__(self, loop, batch, length, conditional):
            import weakref

            self.model_ref = weakref.ref(loop.model)
            made.append(self)

    monkeypatch.setattr(graph_mod, "CapturedLoop", FakeCapture)
    monkeypatch.setattr(graph_mod.torch.cuda, "synchronize", lambda device=None: None)
    graph_mod.clear_graphs()
    held = {"model": DiT(DiTConfig.from_name("tiny", vocab_size=61, model_length=12, hidden_dim=64, n_blocks=1,
                                             n_heads=2, cond_dim=32))}

    def loop_for(**kw):
        return SamplingLoop(held["model"], SamplerConfig(batch=2, length=12, **kw), torch.device("cpu"), None,
                            torch.Generator())

    g1, _ = graph_mod.graph_for(loop_for(steps=3), 2, 12, False)
    assert graph_mod.graph_for(loop_for(steps=3, seed=9), 2, 12, False)[0] is g1      # a new seed: a replay
    assert graph_mod.graph_for(loop_for(steps=4), 2, 12, False)[0] is not g1          # a new setting: a capture
    held["model"].double()                                                             # the weights moved
    assert graph_mod.graph_for(loop_for(steps=3), 2, 12, False)[0] is not g1
    for steps in range(5, 5 + 2 * graph_mod.MAX_GRAPHS):
        graph_mod.graph_for(loop_for(steps=steps), 2, 12, False)
    assert len(graph_mod._GRAPHS) == graph_mod.MAX_GRAPHS
    held.clear()                                                                       # the model is gone
    import gc

    gc.collect()
    other = DiT(DiTConfig.from_name("tiny", vocab_size=61, model_length=12, hidden_dim=64, n_blocks=1, n_heads=2,
                                    cond_dim=32))
    graph_mod.graph_for(SamplingLoop(other, SamplerConfig(batch=2, length=12), torch.device("cpu"), None,
                                     torch.Generator()), 2, 12, False)
    assert len(graph_mod._GRAPHS) == 1                     # the dead model's graphs were dropped
    assert graph_mod.clear_graphs() == 1 and not graph_mod._GRAPHS
