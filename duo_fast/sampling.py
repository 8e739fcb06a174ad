"""Few-step ancestral sampling of a Duo denoiser (docs/math.md section 2).

``z_1 ~ Uniform``; times ``linspace(1, t_min, N + 1)`` (or a Psi time profile, ``duo_fast.psi``);
each of the ``N`` steps is one denoiser call at ``(z_t, sigma = -log alpha_t)`` and one exact
posterior draw (a Psi mixture when ``kappa`` or ``psi`` is set: per-step kappas computed on the
host before the loop); then the final step at ``t_min``: ``greedy`` (argmax of one more
denoiser call, the Greedy-Tail sampler), ``ancestral`` (the posterior with ``alpha_s = 1``) or
``none``. Prompts and infilling clamp known positions before the first call and after every draw.

Each draw is fused with the denoiser's output projection by default
(``ops.sample_posterior_linear``: the logits are never written). Nucleus sampling: the PyTorch
path keeps the chunked fused form (a sort per chunk); the Triton path writes the logits once and
finds each row's cut by bisection, without a sort (``ops.posterior.NUCLEUS_METHOD``). On CUDA
the whole loop (every step and the final one) is captured once per shape in a CUDA graph and
replayed: the prior, the known tokens and the kernels' seeds live in static device tensors
refilled before each replay, so every replay draws fresh noise, and a replay launches no Python.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference as ref
from .model import DiT
from .ops import sample_posterior, sample_posterior_linear
from .ops._dispatch import use_triton
from .ops.posterior import NUCLEUS_METHOD
from .psi import PsiConfig, step_kappas, time_grid

__all__ = ["SamplerConfig", "generate", "SCHEDULES"]

SCHEDULES: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "loglinear": ref.alpha_loglinear,
    "cosine": ref.alpha_cosine,
}
NOISE_REMOVAL = ("greedy", "ancestral", "none")


@dataclass
class SamplerConfig:
    steps: int = 8
    batch: int = 16
    length: int | None = None            # default: the model's length
    schedule: str = "loglinear"
    noise_removal: str = "greedy"
    top_p: float = 1.0                   # nucleus sampling of x_theta when < 1
    kappa: tuple[float, float] | None = None   # Psi sampler: kappa from [0] at the first step to [1] at the last
    psi: PsiConfig | None = None         # Psi sampler as the public sampling.psi block (time profile, modes)
    t_min: float = 1e-5
    seed: int = 0
    fused: bool = True                   # draws fused with the output projection (no logits; see nucleus_method)
    cuda_graph: bool = True              # on CUDA: capture the loop once per shape, replay it

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError("steps and batch must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.noise_removal not in NOISE_REMOVAL:
            raise ValueError(f"noise_removal must be one of {NOISE_REMOVAL}, got {self.noise_removal!r}")
        if self.kappa is not None and not all(0 <= k <= 1 for k in self.kappa):
            raise ValueError(f"Psi kappa must lie in [0, 1], got {self.kappa}")
        if self.kappa is not None and self.psi is not None:
            raise ValueError("give either kappa (a linear kappa ramp) or psi (the public Psi schedules), not both")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}")


class _Loop:
    """The sampling loop for one shape: ``(prior z (B, L), seeds (steps + 1,) int64) -> ids``.

    Every per-step scalar (``alpha_s``, ``alpha_t``, ``sigma``, ``kappa``) is a device tensor
    built once here, before any capture, and the seeds are a device tensor indexed by views:
    a step turns no Python number into a tensor and reads nothing back, so the same code runs
    eagerly and inside a CUDA graph (``tests/test_host_sync.py`` counts it on CPU)."""

    def __init__(self, model: DiT, cfg: SamplerConfig, device: torch.device, step_fn: Callable[..., Tensor] | None,
                 generator: torch.Generator) -> None:
        self.model, self.cfg, self.device, self.step_fn, self.gen = model, cfg, device, step_fn, generator
        grid = time_grid(cfg.psi, cfg.steps, cfg.t_min, cfg.schedule)
        alphas = SCHEDULES[cfg.schedule](grid)[0]
        self.alphas = alphas.to(device)                               # (steps + 1,) float64
        self.sigmas = (-alphas.log()).float().to(device)              # the denoiser's time input per step
        self.one = torch.ones((), dtype=torch.float64, device=device)  # alpha_s of the final step
        kappas = None
        if cfg.kappa is not None:
            kappas = torch.linspace(cfg.kappa[0], cfg.kappa[1], cfg.steps, dtype=torch.float64)
        elif cfg.psi is not None:
            kappas = step_kappas(cfg.psi, grid, cfg.schedule)[: cfg.steps]
        self.kappas = None if kappas is None else kappas.to(device)  # (steps,) float64, host-computed
        self.fused = cfg.fused and step_fn is None
        self.nfe = cfg.steps + (cfg.noise_removal != "none")

    def _draw(self, z: Tensor, a_s: Tensor, i_t: int, seed: Tensor, final: str | None,
              kappa: Tensor | None) -> Tensor:
        a_t, sigma = self.alphas[i_t], self.sigmas[i_t]
        if self.fused:
            h = self.model(z, sigma, return_hidden=True)
            lin = self.model.output_layer.linear
            return sample_posterior_linear(h, lin.weight, lin.bias, z, a_s, a_t, seed=seed, generator=self.gen, final=final,
                                           kappa=kappa, top_p=self.cfg.top_p)
        logits = self.model(z, sigma)
        if self.step_fn is not None and final is None:
            return self.step_fn(logits, z, a_s, a_t, generator=self.gen)
        return sample_posterior(logits, z, a_s, a_t, seed=seed, generator=self.gen, final=final, top_p=self.cfg.top_p,
                                kappa=kappa)

    def __call__(self, z: Tensor, seeds: Tensor, progress: bool = False, known: Tensor | None = None,
                 mask: Tensor | None = None) -> Tensor:
        """z: (B, L) int64 prior; seeds: (steps + 1,) int64 on the loop's device; ``known`` (B, L)
        int64 and ``mask`` (B, L) bool: positions clamped to ``known`` before the first denoiser call
        and after every draw, the final one included (prompts, infilling)."""
        from tqdm.auto import tqdm

        cfg = self.cfg

        def clamp(z: Tensor) -> Tensor:
            return z if mask is None else torch.where(mask, known, z)

        z = clamp(z)
        for i in tqdm(range(cfg.steps), disable=not progress, desc="sample", leave=False, dynamic_ncols=True):
            kappa = None if self.kappas is None else self.kappas[i]
            z = clamp(self._draw(z, self.alphas[i + 1], i, seeds[i:i + 1], None, kappa))
        if cfg.noise_removal != "none":
            z = clamp(self._draw(z, self.one, cfg.steps, seeds[cfg.steps:], cfg.noise_removal, None))
        return z


class _Graph:
    """A :class:`_Loop` captured in a CUDA graph, with its static input and output tensors."""

    def __init__(self, loop: _Loop, batch: int, length: int, conditional: bool) -> None:
        import weakref

        dev = loop.device
        self.model_ref = weakref.ref(loop.model)
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


_GRAPHS: dict[tuple, _Graph] = {}


def _graph_for(loop: _Loop, batch: int, length: int, conditional: bool) -> tuple[_Graph, float]:
    """The cached graph of this model and shape, captured on first use; (graph, capture seconds)."""
    cfg = loop.cfg
    key = (id(loop.model), str(loop.device), batch, length, cfg.steps, cfg.schedule, cfg.noise_removal, cfg.top_p,
           cfg.kappa, cfg.psi, cfg.t_min, loop.fused, conditional)
    g = _GRAPHS.get(key)
    if g is not None and g.model_ref() is loop.model:
        return g, 0.0
    t0 = time.perf_counter()
    g = _GRAPHS[key] = _Graph(loop, batch, length, conditional)
    torch.cuda.synchronize(loop.device)
    return g, time.perf_counter() - t0


@torch.no_grad()
def generate(model: DiT, cfg: SamplerConfig, device: torch.device | str | None = None,
             progress: bool = True, step_fn: Callable[..., Tensor] | None = None, prefix: Tensor | None = None,
             known_mask: Tensor | None = None) -> tuple[Tensor, dict[str, float | str]]:
    """Sample ``cfg.batch`` sequences. Returns ``(ids (batch, length) int64, stats)``.

    Conditioning: ``prefix`` (P,) or (batch, P) int token ids, ``P <= length``, fixes positions
    ``0 .. P-1`` (a prompt); with ``known_mask`` ((P,) or (batch, P) bool, same shape as
    ``prefix``) only the positions where it is True are fixed (infilling: ``prefix`` is then the
    template, any ids in its gaps). Fixed positions hold their token from the first denoiser call
    to the end (clamped after every draw, the final one included); the rest is sampled.

    ``stats``: ``wall_seconds`` (the whole call: setup, the prior, on CUDA the graph capture of a
    new shape, the loop), ``loop_seconds`` (the sampling loop alone), ``graph_capture_seconds``
    (0 unless this call captured a graph), ``nfe`` (denoiser calls), and ``samples_per_s``,
    ``tokens_per_s``, ``nfe_per_s`` over ``wall_seconds``, so the first batch of a shape pays
    for its capture. ``seconds`` is ``wall_seconds``. With ``top_p < 1``, ``nucleus`` says how
    the nucleus was found (a sort on the PyTorch path, a bisection cut on the Triton path).
    ``step_fn(logits, z, alpha_s, alpha_t, generator=...)`` replaces the posterior draw of the
    steps before the final one (the benchmark's reference-style sampler uses it; never graphed)."""
    t_call = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    K = model.config.vocab_size
    L = cfg.length or model.config.model_length
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    loop = _Loop(model, cfg, device, step_fn, gen)
    # One kernel seed per posterior draw, drawn on the CPU and copied once, before the loop.
    seeds = torch.randint(0, 2**62, (cfg.steps + 1,), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    known, mask = _conditioning(prefix, known_mask, cfg.batch, L, K, device)
    z = torch.randint(0, K, (cfg.batch, L), generator=gen, device=device)
    capture = 0.0
    graph = None
    if device.type == "cuda" and cfg.cuda_graph and step_fn is None:
        graph, capture = _graph_for(loop, cfg.batch, L, known is not None)
    _sync(device)
    t0 = time.perf_counter()
    z = graph(z, seeds, known, mask) if graph is not None else loop(z, seeds, progress, known, mask)
    _sync(device)
    t1 = time.perf_counter()
    wall = t1 - t_call
    stats = {"wall_seconds": wall, "seconds": wall, "loop_seconds": t1 - t0, "graph_capture_seconds": capture,
             "nfe": loop.nfe, "samples_per_s": cfg.batch / wall, "tokens_per_s": cfg.batch * L / wall,
             "nfe_per_s": loop.nfe / wall}
    if cfg.top_p < 1:
        stats["nucleus"] = NUCLEUS_METHOD["triton" if use_triton(z) else "torch"]
    return z, stats


def _conditioning(prefix: Tensor | None, known_mask: Tensor | None, batch: int, length: int, K: int,
                  device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """(known ids (B, L) int64, mask (B, L) bool) on ``device``, or (None, None) without conditioning."""
    if prefix is None:
        if known_mask is not None:
            raise ValueError("known_mask needs prefix (the template whose masked positions are kept)")
        return None, None
    prefix = torch.as_tensor(prefix)
    if prefix.dtype.is_floating_point or prefix.dtype == torch.bool or prefix.dim() not in (1, 2):
        raise ValueError(f"prefix must be integer token ids of shape (P,) or (batch, P), got {prefix.dtype} "
                         f"{tuple(prefix.shape)}")
    if prefix.dim() == 2 and prefix.shape[0] != batch:
        raise ValueError(f"prefix has {prefix.shape[0]} rows for a batch of {batch}")
    P = prefix.shape[-1]
    if P > length:
        raise ValueError(f"prefix has {P} tokens, more than the sampled length {length}")
    ids = prefix.detach().to("cpu", torch.int64).numpy()        # checked on the host, once, before the loop
    if P and (ids.min() < 0 or ids.max() >= K):
        raise ValueError(f"prefix ids must be in [0, {K}) (the model's vocabulary)")
    m = torch.ones(prefix.shape, dtype=torch.bool) if known_mask is None else torch.as_tensor(known_mask)
    if m.dtype != torch.bool or m.shape != prefix.shape:
        raise ValueError(f"known_mask must be bool with the shape of prefix {tuple(prefix.shape)}, got {m.dtype} "
                         f"{tuple(m.shape)}")
    known = torch.zeros((batch, length), dtype=torch.int64)
    mask = torch.zeros((batch, length), dtype=torch.bool)
    known[:, :P] = prefix.to("cpu", torch.int64)
    mask[:, :P] = m.cpu()
    return known.to(device), mask.to(device)


def _sync(device: torch.device) -> None:
    """Wait for the device (timing only: before and after the loop, never inside it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
