"""The sampler's configuration, the single source of its fields, defaults and checks: the
``sample`` and ``eval`` flags are generated from it (``duo_fast.cli``) and the CUDA-graph cache
key is derived from it (``sampling.graph``), so a new field can never reuse a stale graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from duo_fast.core.noise_schedule import NOISE_SCHEDULES
from duo_fast.sampling.psi import PsiConfig

__all__ = ["SamplerConfig", "SamplerConfigError", "FINAL_STEPS", "flag_fields"]

# The final step at t_min: the Greedy-Tail argmax, the posterior with alpha_s = 1, or nothing.
FINAL_STEPS = ("greedy", "ancestral", "none")


def _field(default: Any, help: str, choices: tuple[Any, ...] | None = None, flag: bool = True, typ: type | None = None,
           default_text: str | None = None) -> Any:
    """A field with its flag's help; ``flag=False``: no flag of its own (set by the command otherwise)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "type": typ,
                                            "default_text": default_text})


class SamplerConfigError(ValueError):
    """A bad sampler setting: ``field`` names it, ``detail`` says what is wrong."""

    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__(f"{field_name} {detail}")
        self.field, self.detail = field_name, detail


@dataclass(frozen=True)
class SamplerConfig:
    """Every setting of :func:`duo_fast.sampling.generate` (frozen: hashable, the graph cache key)."""

    steps: int = _field(8, "denoiser calls before the final step")
    batch: int = _field(16, "sequences sampled in parallel")
    length: int | None = _field(None, "sequence length", typ=int, default_text="the model's")
    schedule: str = _field("loglinear", "noise schedule of the time grid", choices=tuple(NOISE_SCHEDULES))
    noise_removal: str = _field("greedy", "final step at t_min: argmax (Greedy-Tail), posterior with alpha_s = 1, or "
                                          "nothing", choices=FINAL_STEPS)
    top_p: float = _field(1.0, "nucleus sampling of x_theta (1: off)")
    kappa: tuple[float, float] | None = _field(None, "Psi sampler: kappa from [0] at the first step to [1] at the last",
                                               flag=False)
    psi: PsiConfig | None = _field(None, "Psi sampler as the public sampling.psi block (time profile, modes)",
                                   flag=False)
    t_min: float = _field(1e-5, "the last time of the grid", flag=False)
    seed: int = _field(0, "random seed (the prior and every draw)", flag=False)
    fused: bool = _field(True, "draws fused with the output projection (no: write the logits and sample from them)")
    cuda_graph: bool = _field(True, "on CUDA, capture the step loop in a CUDA graph (no: run it eagerly)")

    def __post_init__(self) -> None:
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise SamplerConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.length is not None and self.length < 1:
            raise SamplerConfigError("length", f"must be >= 1, got {self.length}")
        if self.schedule not in NOISE_SCHEDULES:
            raise SamplerConfigError("schedule", f"must be one of {sorted(NOISE_SCHEDULES)}, got {self.schedule!r}")
        if self.noise_removal not in FINAL_STEPS:
            raise SamplerConfigError("noise_removal", f"must be one of {FINAL_STEPS}, got {self.noise_removal!r}")
        if self.kappa is not None and not all(0 <= k <= 1 for k in self.kappa):
            raise SamplerConfigError("kappa", f"must lie in [0, 1] (Psi kappa), got {self.kappa}")
        if self.kappa is not None and self.psi is not None:
            raise SamplerConfigError("kappa", "and psi: give either kappa (a linear kappa ramp) or psi (the public Psi "
                                              "schedules), not both")
        if not 0 < self.top_p <= 1:
            raise SamplerConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 < self.t_min < 1:
            raise SamplerConfigError("t_min", f"must be in (0, 1), got {self.t_min}")

    def graph_key(self) -> SamplerConfig:
        """The configuration as a CUDA graph sees it: every field but the seed, which each replay
        refills (the prior and the kernels' seeds are the graph's static inputs)."""
        return dataclasses.replace(self, seed=0)


def flag_fields() -> list[dataclasses.Field]:
    """The fields that are command-line flags of ``sample`` and ``eval`` (``--steps`` ... ``--cuda-graph``)."""
    return [f for f in dataclasses.fields(SamplerConfig) if f.metadata.get("flag", True)]
