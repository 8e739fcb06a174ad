"""Test helper: the denoiser's forward pass of docs/math.md section 7 written out in float64 with
explicit per-head loops, the oracle of the model tests."""

from __future__ import annotations

import math

import torch

from duo_fast.model import DiT


def manual_forward(model: DiT, ids: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The forward pass of section 7 written out with explicit per-head loops (float64)."""
    m = model.double()
    cfg = m.config
    D, H = cfg.hidden_dim, cfg.n_heads
    hd = D // H
    x = m.vocab_embed.embedding[ids]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    emb = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], -1)
    c = torch.nn.functional.silu(m.sigma_map.mlp[2](torch.nn.functional.silu(m.sigma_map.mlp[0](emb))))
    L = ids.shape[1]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rot(v):  # v (B, L, hd)
        v1, v2 = v[..., : hd // 2], v[..., hd // 2:]
        return v * cos + torch.cat([-v2, v1], -1) * sin

    def ln(v, w):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * w

    for blk in m.blocks:
        mod = blk.adaLN_modulation(c)[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = [mod[..., i * D:(i + 1) * D] for i in range(6)]
        h = ln(x, blk.norm1.weight) * (1 + sc1) + sh1
        qkv = h @ blk.attn_qkv.weight.T
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        heads = []
        for j in range(H):
            sl = slice(j * hd, (j + 1) * hd)
            qj, kj = rot(q[..., sl]), rot(k[..., sl])
            att = torch.softmax(qj @ kj.transpose(-1, -2) / math.sqrt(hd), -1)
            heads.append(att @ v[..., sl])
        x = x + g1 * (torch.cat(heads, -1) @ blk.attn_out.weight.T)
        h = ln(x, blk.norm2.weight) * (1 + sc2) + sh2
        x = x + g2 * blk.mlp[2](torch.nn.functional.gelu(blk.mlp[0](h), approximate="tanh"))
    ol = m.output_layer
    sh, sc = ol.adaLN_modulation(c)[:, None].chunk(2, -1)
    return ol.linear(ln(x, ol.norm_final.weight) * (1 + sc) + sh)
