"""Triton kernels: the curriculum's relaxed input embedding (docs/math.md section 5).

Per token ``n`` with clean id ``x``: ``w_j = at [j = x] + st eps_j`` (``eps`` standard normal),
``z_t = argmax_j w_j``, ``h0 = sum_j softmax(w / tau)_j E_j``. Structurally attention with random
scores: scores ``w / tau`` from a counter-based RNG (never stored), values the embedding rows.

* ``_re_fwd_kernel`` (grid: token blocks x D blocks). Dense mode: one pass over the vocabulary
  with an online softmax (running max, running sum, rescaled accumulator ``P @ E``) and the
  running argmax of ``w``; writes ``h0``, ``z_t`` and the normaliser ``norm = (max w, log sum
  exp((w - max w) / tau))`` (kept in w-space: ``w / tau`` rounded at the scale ``1/tau`` would cost
  digits at small ``tau``). Sparse mode: ``norm`` and ``z_t`` come from ``_re_stats_kernel`` (an
  RNG-only pass), the weights
  are then known exactly, and a (token block, vocabulary chunk) tile whose weights are all below
  ``delta`` skips its embedding load and its matmul. With ``delta = 1e-6 / K`` the dropped weight
  per token is below ``K * delta = 1e-6``, so ``|h0 - h0_exact| <= 1e-6 max_j |E_j|``.
* ``_re_stats_kernel`` (grid: token blocks): the RNG-only pass: ``z_t`` and ``norm``.
* ``_re_bwd_kernel`` (grid: vocabulary blocks x D blocks): ``dE = P^T dh0``, regenerating the
  same noise from the same seed and counters (no gradient flows to the noise), each program
  owning its tile of ``dE`` (no atomics); sparse mode skips tiles with all weights below ``delta``.

Randomness: Philox keyed by ``seed`` with counters ``(vocabulary id, token, 2, 0)`` and a
Box-Muller transform: the noise of a (token, id) pair does not depend on the block sizes, so the
forward, the backward and the sparse pre-pass see the same ``eps``. ``HAS_EPS`` replaces the RNG
by an explicit (N, K) tensor (tests). Dots (``_common.mma``): fp32 inputs use IEEE fp32, bf16/fp16
tensor cores with fp32 accumulation; the interpreter runs the same bf16 branch with only the dot
emulated. This module never imports duo_fast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast, interpreting, mma, normal32

__all__ = ["relaxed_stats", "relaxed_fwd", "relaxed_bwd", "fwd_blocks", "stats_blocks", "bwd_blocks",
           "sparse_delta", "warps"]

_NOISE_STREAM = 2


def sparse_delta(K: int) -> float:
    """Weight below which the sparse mode may drop an entry: the dropped mass per token is < 1e-6."""
    return 1e-6 / K


@triton.jit
def _noise(seed, rows, cols, eps_ptr, stride_en, mask, HAS_EPS: tl.constexpr):
    """Standard normal eps of the (rows, cols) tile: Philox + Box-Muller, or loaded (tests)."""
    if HAS_EPS:
        eps = tl.load(eps_ptr + rows.to(tl.int64)[:, None] * stride_en + cols[None, :], mask=mask,
                      other=0.0).to(tl.float32)
    else:
        c0 = cols[None, :] + rows[:, None] * 0
        c1 = rows[:, None] + cols[None, :] * 0
        r0, r1, _, _ = tl.philox(seed, c0, c1, c0 * 0 + 2, c0 * 0)
        eps = normal32(r0, r1)
    return eps


@triton.jit
def _latent(eps, cols, x0, at, st, cmask):
    """w = at [col = x] + st eps, -inf outside the vocabulary."""
    w = st[:, None] * eps + tl.where(cols[None, :] == x0[:, None], at[:, None], 0.0)
    return tl.where(cmask[None, :], w, float("-inf"))


@triton.jit
def _online_step(w, k0, m_w, l_i, best_i, inv_tau):
    """Fold a tile of latents into the running (max of w, sum of exp((w - max)/tau), argmax).
    The max is kept in w-space: (w - m) / tau loses no digits where w is close to m, whereas
    w / tau - m / tau would round both terms at the scale of 1/tau (~1e3 at tau = 1e-3)."""
    blk_w = tl.max(w, 1)
    blk_i = tl.argmax(w, 1).to(tl.int32) + k0
    take = blk_w > m_w
    best_i = tl.where(take, blk_i, best_i)
    m_new = tl.maximum(m_w, blk_w)
    scale = tl.exp((m_w - m_new) * inv_tau)
    p = tl.exp((w - m_new[:, None]) * inv_tau)
    l_i = l_i * scale + tl.sum(p, 1)
    return m_new, l_i, best_i, (p, scale)


@triton.jit
def _weights(w, m_w, log_l, inv_tau):
    """softmax(w / tau) of a tile from the row's (max of w, log of the normaliser)."""
    return tl.exp((w - m_w[:, None]) * inv_tau - log_l[:, None])


@triton.jit(do_not_specialize=["seed"])       # one compile whatever the seed
def _re_stats_kernel(x0_ptr, at_ptr, st_ptr, eps_ptr, stride_en, zt_ptr, norm_ptr, N, K, seed: tl.int64, inv_tau,
                     HAS_EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    x0 = tl.load(x0_ptr + rows, mask=rmask, other=0).to(tl.int32)
    at = tl.load(at_ptr + rows, mask=rmask, other=0.0)
    st = tl.load(st_ptr + rows, mask=rmask, other=1.0)
    m_w = tl.full((BLOCK_M,), float("-inf"), tl.float32)      # running max of w (its argmax is z_t)
    l_i = tl.zeros((BLOCK_M,), tl.float32)                    # running sum of exp((w - m_w) / tau)
    best_i = tl.zeros((BLOCK_M,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        eps = _noise(seed, rows, cols, eps_ptr, stride_en, rmask[:, None] & cmask[None, :], HAS_EPS)
        w = _latent(eps, cols, x0, at, st, cmask)
        m_w, l_i, best_i, _ = _online_step(w, k0, m_w, l_i, best_i, inv_tau)
    tl.store(zt_ptr + rows, best_i.to(tl.int64), mask=rmask)
    tl.store(norm_ptr + rows, m_w, mask=rmask)
    tl.store(norm_ptr + N + rows, tl.log(l_i), mask=rmask)


@triton.jit(do_not_specialize=["seed"])       # one compile whatever the seed
def _re_fwd_kernel(x0_ptr, at_ptr, st_ptr, e_ptr, stride_ek, eps_ptr, stride_en, zt_ptr, norm_ptr, h_ptr, stride_hn,
                   N, K, D, seed: tl.int64, inv_tau, delta, HAS_EPS: tl.constexpr, SPARSE: tl.constexpr, IEEE: tl.constexpr,
                   EMULATE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    x0 = tl.load(x0_ptr + rows, mask=rmask, other=0).to(tl.int32)
    at = tl.load(at_ptr + rows, mask=rmask, other=0.0)
    st = tl.load(st_ptr + rows, mask=rmask, other=1.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_w = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    best_i = tl.zeros((BLOCK_M,), tl.int32)
    if SPARSE:
        m_w = tl.load(norm_ptr + rows, mask=rmask, other=0.0)
        log_l = tl.load(norm_ptr + N + rows, mask=rmask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        eps = _noise(seed, rows, cols, eps_ptr, stride_en, rmask[:, None] & cmask[None, :], HAS_EPS)
        w = _latent(eps, cols, x0, at, st, cmask)
        e_ptrs = e_ptr + cols.to(tl.int64)[:, None] * stride_ek + dd[None, :]
        e_mask = cmask[:, None] & dmask[None, :]
        if SPARSE:
            p = tl.where(rmask[:, None], _weights(w, m_w, log_l, inv_tau), 0.0)
            if tl.max(tl.max(p, 1), 0) >= delta:            # otherwise every weight of the tile is dropped
                e = tl.load(e_ptrs, mask=e_mask, other=0.0)
                acc = mma(cast(p, e.dtype, EMULATE), e, acc, IEEE, EMULATE)
        else:
            m_w, l_i, best_i, ps = _online_step(w, k0, m_w, l_i, best_i, inv_tau)
            p, scale = ps
            e = tl.load(e_ptrs, mask=e_mask, other=0.0)
            acc = acc * scale[:, None]
            acc = mma(cast(p, e.dtype, EMULATE), e, acc, IEEE, EMULATE)
    if not SPARSE:
        acc = acc / l_i[:, None]
        if pid_d == 0:
            tl.store(zt_ptr + rows, best_i.to(tl.int64), mask=rmask)
            tl.store(norm_ptr + rows, m_w, mask=rmask)
            tl.store(norm_ptr + N + rows, tl.log(l_i), mask=rmask)
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hn + dd[None, :], cast(acc, h_ptr.dtype.element_ty, EMULATE),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["seed"])       # one compile whatever the seed
def _re_bwd_kernel(x0_ptr, at_ptr, st_ptr, eps_ptr, stride_en, norm_ptr, dh_ptr, stride_dn, de_ptr, stride_dek,
                   N, K, D, seed: tl.int64, inv_tau, delta, HAS_EPS: tl.constexpr, SPARSE: tl.constexpr, IEEE: tl.constexpr,
                   EMULATE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        x0 = tl.load(x0_ptr + rows, mask=rmask, other=0).to(tl.int32)
        at = tl.load(at_ptr + rows, mask=rmask, other=0.0)
        st = tl.load(st_ptr + rows, mask=rmask, other=1.0)
        m_w = tl.load(norm_ptr + rows, mask=rmask, other=0.0)
        log_l = tl.load(norm_ptr + N + rows, mask=rmask, other=0.0)
        eps = _noise(seed, rows, cols, eps_ptr, stride_en, rmask[:, None] & cmask[None, :], HAS_EPS)
        w = _latent(eps, cols, x0, at, st, cmask)
        p = tl.where(rmask[:, None], _weights(w, m_w, log_l, inv_tau), 0.0)     # (BLOCK_M, BLOCK_K)
        dh_ptrs = dh_ptr + rows.to(tl.int64)[:, None] * stride_dn + dd[None, :]
        dh_mask = rmask[:, None] & dmask[None, :]
        if SPARSE:
            if tl.max(tl.max(p, 1), 0) >= delta:
                dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
                acc = mma(tl.trans(cast(p, dh.dtype, EMULATE)), dh, acc, IEEE, EMULATE)
        else:
            dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
            acc = mma(tl.trans(cast(p, dh.dtype, EMULATE)), dh, acc, IEEE, EMULATE)
    tl.store(de_ptr + cols.to(tl.int64)[:, None] * stride_dek + dd[None, :], acc, mask=cmask[:, None] & dmask[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def fwd_blocks(N: int, K: int, D: int, interpret: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_M tokens, BLOCK_K ids, BLOCK_D features) of the forward kernel: tensor-core tiles on
    a GPU; large tiles in the interpreter, which runs programs one by one in Python."""
    if interpreting() if interpret is None else interpret:
        return _pow2(N, 16, 128), _pow2(K, 16, 512), _pow2(D, 16, 256)
    return (64 if N >= 64 else 16), (64 if K >= 64 else 16), (128 if D >= 128 else 64 if D >= 64 else 16)


def stats_blocks(K: int, interpret: bool | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of the RNG-only pass."""
    if interpreting() if interpret is None else interpret:
        bk = _pow2(K, 16, 2048)
        return max(1, 65536 // bk), bk
    bk = 512 if K >= 512 else 64
    return 2048 // bk, bk


def bwd_blocks(N: int, K: int, D: int, interpret: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_D) of the backward kernel."""
    if interpreting() if interpret is None else interpret:
        return _pow2(N, 16, 512), _pow2(K, 16, 128), _pow2(D, 16, 256)
    return (64 if N >= 64 else 16), (64 if K >= 64 else 16), (128 if D >= 128 else 64 if D >= 64 else 16)


def warps(rows: int, cols: int) -> int:
    """8 warps for accumulator tiles of 8k elements and more (64 x 128), else 4."""
    return 8 if rows * cols >= 8192 else 4


def _check(x0: torch.Tensor, at: torch.Tensor, st: torch.Tensor, eps: torch.Tensor | None, K: int) -> int:
    N = x0.shape[0]
    for name, t, dt in (("x0", x0, torch.int64), ("at", at, torch.float32), ("st", st, torch.float32)):
        if t.shape != (N,) or not t.is_contiguous() or t.dtype != dt:
            raise ValueError(f"{name} must be a contiguous ({N},) {dt} tensor, got {tuple(t.shape)} {t.dtype}")
    if eps is not None and (eps.shape != (N, K) or eps.stride(1) != 1):
        raise ValueError(f"eps must be ({N}, {K}) with unit stride along the vocabulary")
    return N


def relaxed_stats(x0: torch.Tensor, at: torch.Tensor, st: torch.Tensor, K: int, tau: float, seed: int,
                  eps: torch.Tensor | None = None, blocks: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RNG-only pass: (zt (N,) int64, norm (2, N) float32: the max of w and the log of the
    normaliser of exp((w - max) / tau))."""
    N = _check(x0, at, st, eps, K)
    zt = torch.empty(N, dtype=torch.int64, device=x0.device)
    norm = torch.empty((2, N), dtype=torch.float32, device=x0.device)
    if N:
        bm, bk = blocks or stats_blocks(K)
        _re_stats_kernel[(triton.cdiv(N, bm),)](x0, at, st, eps if eps is not None else at, 0 if eps is None else
                                               eps.stride(0), zt, norm, N, K, seed, 1.0 / tau, HAS_EPS=eps is not None,
                                               BLOCK_M=bm, BLOCK_K=bk, num_warps=4)
    return zt, norm


def relaxed_fwd(x0: torch.Tensor, at: torch.Tensor, st: torch.Tensor, embedding: torch.Tensor, tau: float, seed: int,
                sparse: bool, eps: torch.Tensor | None = None,
                blocks: tuple[tuple[int, int, int], tuple[int, int]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, at, st (N,); embedding (K, D) fp32/bf16/fp16 with unit stride along D; ``blocks``
    overrides ((BLOCK_M, BLOCK_K, BLOCK_D), (stats BLOCK_M, stats BLOCK_K)).
    Returns (h0 (N, D) in the embedding's dtype, zt (N,) int64, norm (2, N) float32)."""
    K, D = embedding.shape
    N = _check(x0, at, st, eps, K)
    if embedding.stride(1) != 1:
        raise ValueError("embedding needs unit stride along D")
    emb = embedding
    h0 = torch.empty((N, D), dtype=emb.dtype, device=x0.device)
    if sparse:
        zt, norm = relaxed_stats(x0, at, st, K, tau, seed, eps, None if blocks is None else blocks[1])
    else:
        zt = torch.empty(N, dtype=torch.int64, device=x0.device)
        norm = torch.empty((2, N), dtype=torch.float32, device=x0.device)
    if N:
        bm, bk, bd = blocks[0] if blocks else fwd_blocks(N, K, D)
        _re_fwd_kernel[(triton.cdiv(N, bm), triton.cdiv(D, bd))](
            x0, at, st, emb, emb.stride(0), eps if eps is not None else at, 0 if eps is None else eps.stride(0), zt,
            norm, h0, h0.stride(0), N, K, D, seed, 1.0 / tau, sparse_delta(K), HAS_EPS=eps is not None, SPARSE=sparse,
            IEEE=emb.dtype == torch.float32, EMULATE=interpreting(), BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd,
            num_warps=warps(bm, bd))
    return h0, zt, norm


def relaxed_bwd(x0: torch.Tensor, at: torch.Tensor, st: torch.Tensor, norm: torch.Tensor, dh: torch.Tensor, K: int,
                tau: float, seed: int, sparse: bool, eps: torch.Tensor | None = None,
                blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """d embedding (K, D) float32 = softmax(w / tau)^T dh, the noise regenerated from ``seed``."""
    N = _check(x0, at, st, eps, K)
    D = dh.shape[1]
    if dh.shape != (N, D) or dh.stride(1) != 1:
        raise ValueError(f"dh must be ({N}, D) with unit stride along D")
    de = torch.zeros((K, D), dtype=torch.float32, device=dh.device)
    if N:
        bm, bk, bd = blocks or bwd_blocks(N, K, D)
        _re_bwd_kernel[(triton.cdiv(K, bk), triton.cdiv(D, bd))](
            x0, at, st, eps if eps is not None else at, 0 if eps is None else eps.stride(0), norm, dh, dh.stride(0), de,
            de.stride(0), N, K, D, seed, 1.0 / tau, sparse_delta(K), HAS_EPS=eps is not None, SPARSE=sparse,
            IEEE=dh.dtype == torch.float32, EMULATE=interpreting(), BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd,
            num_warps=warps(bk, bd))
    return de
