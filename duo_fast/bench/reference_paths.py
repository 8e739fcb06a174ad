"""What the public implementation does, written out for the benchmarks to time against ours
(the numerically careful reference math is ``duo_fast.reference``; these are its costly
reference-*style* execution paths)."""

from __future__ import annotations

import torch

from duo_fast import reference as ref

__all__ = ["reference_ttable_lookup", "reference_relaxed_embedding", "public_posterior_step"]


def reference_ttable_lookup(gamma: torch.Tensor, p_table: torch.Tensor, gmin: float, gmax: float,
                            K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round gamma to the nearest grid point, gather p, finite-difference the derivative from the
    neighbours, and check the range with ``.item()`` (a host synchronisation) on every call."""
    if bool((gamma < gmin).any().item()) or bool((gamma > gmax).any().item()):
        raise ValueError("gamma out of range")
    n = p_table.shape[0]
    h = (gmax - gmin) / (n - 1)
    idx = torch.round((gamma - gmin) / h).long()
    p = p_table[idx]
    dp = (p_table[(idx + 1).clamp(max=n - 1)] - p_table[(idx - 1).clamp(min=0)]) / (2 * h)
    return (K * p - 1) / (K - 1), K / (K - 1) * dp


def reference_relaxed_embedding(x0: torch.Tensor, gamma: torch.Tensor, tau: float, E: torch.Tensor,
                                eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The curriculum input as the public implementation builds it (its ``simple`` curriculum):
    the int64 one-hot of ``x``, float32 noise, the float32 latents ``alpha onehot + sigma eps``
    scaled by ``1/tau`` and their argmax, all (B, L, K); then in the embedding layer
    ``einsum(softmax(latents).float(), E.float())``. Its trainer calls the denoiser inside
    ``autocast(dtype=float32)`` and the DiT enters bf16 autocast only after the embedding, so this
    einsum runs in float32 whatever the parameters' dtype. Returns (h0 (B, L, D) float32, zt (B, L))."""
    K = E.shape[0]
    onehot = torch.nn.functional.one_hot(x0, K)
    if eps is None:
        eps = torch.randn(onehot.shape, device=x0.device, dtype=torch.float32)
    at, st = ref.gaussian_coefficients(gamma.float())
    w = (at[:, None, None] * onehot + st[:, None, None] * eps.float()) * (1.0 / tau)
    return torch.einsum("blv,ve->ble", torch.softmax(w, -1).float(), E.float()), w.argmax(-1)


def public_posterior_step(logits: torch.Tensor, zt: torch.Tensor, alpha_s: float, alpha_t: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """One sampling step as the public sampler runs it: log-softmax of the logits (float32), cast
    to float64, ``exp``, the float64 posterior written elementwise with a one-hot of ``z_t``, and
    its ``sample_categorical``: ``argmax(q / (1e-10 - log(u + 1e-10)))`` with float64 uniforms (one
    log and one division per element). logits (B, L, K); returns (B, L) int64."""
    K = logits.shape[-1]
    x0 = logits.float().log_softmax(-1).to(torch.float64).exp()
    a_s = torch.as_tensor(alpha_s, dtype=torch.float64, device=logits.device)
    a_t = torch.as_tensor(alpha_t, dtype=torch.float64, device=logits.device)
    a_ts = a_t / a_s
    oh = torch.nn.functional.one_hot(zt, K).to(torch.float32)
    num = a_t * K * x0 * oh + (a_ts - a_t) * oh + (a_s - a_t) * x0 + (1 - a_ts) * (1 - a_s) / K
    q = num / (a_t * K * torch.gather(x0, -1, zt[..., None]) + (1 - a_t))
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=torch.float64)
    return (q / (1e-10 - (u + 1e-10).log())).argmax(-1)
