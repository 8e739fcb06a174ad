"""Denoiser configuration with the presets of docs/math.md section 7."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["DiTConfig", "PRESETS"]

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_dim=256, n_blocks=8, n_heads=8, cond_dim=128),
    "small": dict(hidden_dim=768, n_blocks=12, n_heads=12, cond_dim=128),
    "medium": dict(hidden_dim=1024, n_blocks=24, n_heads=16, cond_dim=128),
}


@dataclass
class DiTConfig:
    """Sizes of the standard denoiser; field names follow the public ``config.json``."""

    vocab_size: int = 50257
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool}[str(f.type)]
            if not isinstance(v, want) or (str(f.type) != "bool" and isinstance(v, bool)):
                raise ValueError(f"{f.name} must be {str(f.type)}, got {v!r}")
        if min(self.model_length, self.hidden_dim, self.cond_dim, self.n_blocks, self.n_heads) < 1:
            raise ValueError("model_length, hidden_dim, cond_dim, n_blocks and n_heads must be >= 1")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.hidden_dim % self.n_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by n_heads {self.n_heads}")
        if (self.hidden_dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "DiTConfig":
        """A preset (``tiny``, ``small``, ``medium``) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        """From a public ``config.json`` dict; unknown keys (``architectures``, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_parameters(self, include_embedding: bool = True) -> int:
        D, C, K = self.hidden_dim, self.cond_dim, self.vocab_size
        block = 2 * D + 3 * D * D + D * D + (D * 4 * D + 4 * D) + (4 * D * D + D) + (C * 6 * D + 6 * D)
        n = self.n_blocks * block + (256 * C + C) + (C * C + C) + D + (C * 2 * D + 2 * D) + (D * K + K)
        return n + (K * D if include_embedding else 0)

    def forward_flops_per_token(self, length: int) -> float:
        """Forward FLOPs per token at sequence length ``length``: 2 per weight of the blocks, the
        conditioning and the output projection (the input embedding is a lookup), plus the
        attention scores and their product with the values (4 L D per block)."""
        return 2.0 * self.num_parameters(include_embedding=False) + 4.0 * self.n_blocks * length * self.hidden_dim
