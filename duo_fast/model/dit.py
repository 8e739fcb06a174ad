"""The standard Duo/MDLM denoiser (a DiT with adaLN conditioning), docs/math.md section 7.

Module names, parameter shapes, parameter order and numerics match the public checkpoints, so
their ``backbone.*`` state dicts load with no conversion. Inputs can be token ids, relaxed
weights over the vocabulary (dense or as ``(indices, weights)`` bags) or a precomputed input
embedding; the output can be the logits or the final hidden state (after the output layer's
adaLN-modulated norm) for kernels that apply the output projection themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from duo_fast.model.config import DiTConfig
from duo_fast.ops.backends import flash_attn_func

_flash_func = flash_attn_func()   # optional: only where flash-attn installs, used for CUDA bf16/fp16 tensors

__all__ = ["DiT", "flash_attention_available"]


def flash_attention_available() -> bool:
    return _flash_func is not None


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in float32, then times ``weight`` (public numerics)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)), [self.dim])
        return x * self.weight[None, None, :]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """``sigma (B,) -> mlp(sinusoidal_256(sigma)) (B, cond_dim)``."""

    def __init__(self, cond_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    @staticmethod
    def sinusoidal(sigma: Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=sigma.device) / half)
        args = sigma[:, None].to(dtype) * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, sigma: Tensor) -> Tensor:
        w = self.mlp[0].weight.dtype
        emb = self.sinusoidal(sigma, self.frequency_dim, dtype=torch.promote_types(w, torch.float32))
        return self.mlp(emb.to(w))


class Rotary(nn.Module):
    """Rotary position embedding (base 10000, non-interleaved "rotate half"). ``forward``
    returns ``cos`` and a signed ``sin`` (the first half negated), float32 or wider (L, head_dim), cached
    per length and device: built on the first call of a shape, before any CUDA-graph capture."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim)))
        self._cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def forward(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (length, device)
        hit = self._cache.get(key)
        if hit is None or torch.compiler.is_compiling():
            dtype = torch.promote_types(self.inv_freq.dtype, torch.float32)
            t = torch.arange(length, device=device, dtype=dtype)
            emb = torch.outer(t, self.inv_freq.to(dtype)).repeat(1, 2)          # (L, head_dim)
            half = emb.shape[-1] // 2
            sign = torch.ones(emb.shape[-1], device=device, dtype=dtype)
            sign[:half].neg_()
            hit = (emb.cos(), emb.sin() * sign)
            if not torch.compiler.is_compiling():
                self._cache[key] = hit
        return hit

    def _apply(self, fn, recurse=True):                           # .to() / .double(): the cache is rebuilt
        self._cache = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):             # a loaded inv_freq: likewise
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)


def apply_rotary(qkv: Tensor, cos: Tensor, sin_signed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """qkv: (B, L, 3, H, hd) -> rotated q, k and v, each (B, L, H, hd); cos/sin_signed: (L, hd).

    ``rotate_half(x) * sin`` is ``swap_halves(x) * sin_signed`` (first half of ``sin``
    negated), and ``q`` and ``k`` are rotated together as one (B, L, 2, H, hd) view: two
    multiplies, one half-swap and one add for both, and ``v`` stays a view of ``qkv``."""
    B, L, _, H, hd = qkv.shape
    cos = cos.to(qkv.dtype)[None, :, None, None, :]
    sin = sin_signed.to(qkv.dtype)[None, :, None, None, :]
    qk = qkv[:, :, :2]
    swapped = qk.unflatten(-1, (2, hd // 2)).flip(-2).flatten(-2)
    qk = qk * cos + swapped * sin
    return qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bidirectional attention. q, k, v: (B, L, H, hd) -> (B, L, H * hd)."""
    B, L, H, hd = q.shape
    if _flash_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_func(q, k, v, 0.0, causal=False).reshape(B, L, H * hd)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False)
    return out.transpose(1, 2).reshape(B, L, H * hd)


class DDiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.dropout = dropout
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, c: Tensor) -> Tensor:
        B, L, D = x.shape
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        q, k, v = apply_rotary(qkv.view(B, L, 3, self.n_heads, D // self.n_heads), cos, sin)
        h = self.attn_out(attention(q, k, v))
        x = x + gate_msa * F.dropout(h, self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(h, self.dropout, self.training)


class EmbeddingLayer(nn.Module):
    """``vocab_embed``: a bare ``(K, D)`` parameter."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_size, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        K = self.embedding.shape[0]
        if isinstance(x, tuple):                       # bags: indices (B, L, k), weights (B, L, k)
            idx, w = x
            if idx.shape != w.shape:
                raise ValueError(f"bag indices {tuple(idx.shape)} and weights {tuple(w.shape)} differ in shape")
            return torch.einsum("blk,blkd->bld", w.to(self.embedding.dtype), self.embedding[idx])
        if x.dtype in (torch.int64, torch.int32):
            return self.embedding[x]
        if x.dim() != 3 or x.shape[-1] != K:
            raise ValueError(f"dense relaxed input must be (B, L, {K}), got {tuple(x.shape)}")
        return x.to(self.embedding.dtype) @ self.embedding   # (B, L, K) weights -> (B, L, D)


class DDitFinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def hidden(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: Tensor, c: Tensor, return_hidden: bool = False) -> Tensor:
        h = self.hidden(x, c)
        return h if return_hidden else self.linear(h)


class DiT(nn.Module):
    """The denoiser. Call as ``model(x, sigma)``:

    * ``x``: token ids (B, L) int64; or dense relaxed weights (B, L, K) float (already
      normalised, e.g. ``softmax(w / tau)``); or a bag ``(indices (B, L, k), weights (B, L, k))``;
      or ``None`` with ``inputs_embeds`` (B, L, D).
    * ``sigma``: (B,) float, ``-log(alpha_t)``; ignored (zeroed) if not ``time_conditioning``.
    * returns logits (B, L, K), or with ``return_hidden=True`` the final hidden state (B, L, D)
      that ``output_layer.linear`` maps to the logits (bf16 on CUDA with autocast: the dtype in
      which autocast runs that projection). On CUDA the blocks and output layer run
      under bf16 autocast (``autocast=False`` turns that off), as in the public model.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        D, C = config.hidden_dim, config.cond_dim
        self.vocab_embed = EmbeddingLayer(D, config.vocab_size)
        self.sigma_map = TimestepEmbedder(C)
        self.rotary_emb = Rotary(config.head_dim)
        self.blocks = nn.ModuleList([DDiTBlock(D, config.n_heads, C, dropout=config.dropout)
                                     for _ in range(config.n_blocks)])
        self.output_layer = DDitFinalLayer(D, config.vocab_size, C)
        self.autocast = True

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def output_projection(self) -> nn.Linear:
        """The output projection (K x D weight, K bias) that maps ``return_hidden`` states to logits."""
        return self.output_layer.linear

    def compile_blocks(self, **kwargs) -> None:
        """``torch.compile`` each transformer block in place (``kwargs`` go to ``torch.compile``)."""
        for block in self.blocks:
            block.compile(**kwargs)

    def forward(self, x: Tensor | tuple[Tensor, Tensor] | None, sigma: Tensor, *,
                inputs_embeds: Tensor | None = None, return_hidden: bool = False) -> Tensor:
        if inputs_embeds is None:
            if x is None:
                raise ValueError("DiT needs token ids, relaxed weights or inputs_embeds")
            if isinstance(x, Tensor) and not x.is_floating_point():
                self._check_ids(x)
            h = self.vocab_embed(x)
        else:
            h = inputs_embeds
        if h.dim() != 3 or h.shape[-1] != self.config.hidden_dim:
            raise ValueError(f"input embedding must be (B, L, {self.config.hidden_dim}), got {tuple(h.shape)}")
        B, L, _ = h.shape
        sigma = sigma.reshape(-1).expand(B) if sigma.numel() in (1, B) else sigma
        if sigma.shape != (B,):
            raise ValueError(f"sigma must have shape ({B},), got {tuple(sigma.shape)}")
        if not self.config.time_conditioning:
            sigma = torch.zeros_like(sigma)
        c = F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb(L, h.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=h.is_cuda and self.autocast):
            for block in self.blocks:
                h = block(h, cos, sin, c)
            # through __call__ either way: module hooks (ZeRO-3 gathering) must see this layer run
            out = self.output_layer(h, c, return_hidden=return_hidden)
        if return_hidden and h.is_cuda and self.autocast:
            out = out.to(torch.bfloat16)     # the hidden state as autocast's output projection consumes it
        return out

    def _check_ids(self, ids: Tensor) -> None:
        # Out-of-range ids would silently read garbage rows on GPU; checked without a host sync.
        K = self.config.vocab_size
        torch._assert_async(((ids >= 0) & (ids < K)).all(), f"token ids out of range [0, {K})")
