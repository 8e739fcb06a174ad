"""Few-step ancestral sampling of a Duo denoiser (docs/math.md section 2).

``z_1 ~ Uniform``; times ``linspace(1, t_min, N + 1)`` (or a Psi time profile, ``sampling.psi``);
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

import torch
from torch import Tensor

from duo_fast.core.noise_schedule import NOISE_SCHEDULES
from duo_fast.model.protocol import Denoiser
from duo_fast.ops.backends import choose
from duo_fast.ops.posterior import NUCLEUS_METHOD
from duo_fast.sampling.conditioning import known_positions
from duo_fast.sampling.config import SamplerConfig
from duo_fast.sampling.psi import step_kappas, time_grid
from duo_fast.sampling.steps import CustomStep, PosteriorStep, Step

__all__ = ["SamplerConfig", "SamplingLoop", "generate"]

class SamplingLoop:
    """The sampling loop for one shape: ``(prior z (B, L), seeds (steps + 1,) int64) -> ids``.

    Every per-step scalar (``alpha_s``, ``alpha_t``, ``sigma``, ``kappa``) is a device tensor
    built once here, before any capture, and the seeds are a device tensor indexed by views:
    a step turns no Python number into a tensor and reads nothing back, so the same code runs
    eagerly and inside a CUDA graph (``tests/sampling/test_host_sync.py`` counts it on CPU). The
    draws are :class:`~duo_fast.sampling.steps.Step` objects: ``step`` for the ``steps`` steps,
    ``final_step`` (or None) at ``t_min``."""

    def __init__(self, model: Denoiser, cfg: SamplerConfig, device: torch.device,
                 step_fn: Callable[..., Tensor] | None, generator: torch.Generator) -> None:
        self.model, self.cfg, self.device, self.step_fn, self.gen = model, cfg, device, step_fn, generator
        grid = time_grid(cfg.psi, cfg.steps, cfg.t_min, cfg.schedule)
        alphas = NOISE_SCHEDULES[cfg.schedule](grid)[0]
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
        self.step: Step = (CustomStep(step_fn, generator) if step_fn is not None
                           else PosteriorStep(self.fused, cfg.top_p, None, generator))
        self.final_step: Step | None = (None if cfg.noise_removal == "none"
                                        else PosteriorStep(self.fused, cfg.top_p, cfg.noise_removal, generator))

    def device_tensors(self) -> tuple[Tensor | None, ...]:
        """The per-step tensors every run of the loop reads (a captured graph keeps them)."""
        return self.alphas, self.sigmas, self.one, self.kappas

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
            z = clamp(self.step(self.model, z, self.alphas[i + 1], self.alphas[i], self.sigmas[i], seeds[i:i + 1],
                                kappa))
        if self.final_step is not None:
            n = cfg.steps
            z = clamp(self.final_step(self.model, z, self.one, self.alphas[n], self.sigmas[n], seeds[n:], None))
        return z


@torch.no_grad()
def generate(model: Denoiser, cfg: SamplerConfig, device: torch.device | str | None = None,
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
    loop = SamplingLoop(model, cfg, device, step_fn, gen)
    # One kernel seed per posterior draw, drawn on the CPU and copied once, before the loop.
    seeds = torch.randint(0, 2**62, (cfg.steps + 1,), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    known, mask = known_positions(prefix, known_mask, cfg.batch, L, K, device)
    z = torch.randint(0, K, (cfg.batch, L), generator=gen, device=device)
    capture = 0.0
    graph = None
    if device.type == "cuda" and cfg.cuda_graph and step_fn is None:
        from duo_fast.sampling.graph import graph_for

        graph, capture = graph_for(loop, cfg.batch, L, known is not None)
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
        stats["nucleus"] = NUCLEUS_METHOD["triton" if choose("sample_posterior", z).impl == "triton" else "torch"]
    return z, stats


def _sync(device: torch.device) -> None:
    """Wait for the device (timing only: before and after the loop, never inside it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
