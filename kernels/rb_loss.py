"""Triton kernels: the Rao-Blackwellized NELBO over a (N, K) block of logits (docs/math.md section 3).

The loss needs, per token, the log-sum-exp of the logits and a handful of sums over the
vocabulary; its gradient is then an elementwise function of each logit and per-token scalars.
So there are two kernels:

* ``_rb_stats_kernel``: per row, pass 1 streams the vocabulary for the online log-sum-exp (the
  logits at ``z_t`` and ``x`` are two scalar loads); pass 2 streams it again (from L2: one row
  per program at GPT-2 size) for the sums that need normalised ``p = softmax(l)``, kept per lane
  and reduced once per row, with ``log1p`` from the reciprocal ``r`` it needs anyway and ``rem``
  only in blocks that have a row with ``beta <= 1``. With ``beta = K a/(1 - a)`` and ``r = 1/(1 + beta p)`` these are::

      rem  = sum_j (log1p(beta p_j) - beta p_j)      (S_log near a = 0, without cancellation)
      s1d  = sum_j log1p(beta p_j)                   (S_log - K log(1 - a), used when beta > 1)
      Q    = sum_j p_j r_j                           (= (1 - a) S of section 3)
      bT2  = sum_j p_j (1 - r_j)                     (= 1 - Q, summed separately: no cancellation)
      cpi  = sum_{j != z_t} p_j,  cpx = sum_{j != x} p_j   (1 - p_i, 1 - p_x without cancellation)

  written as a (9, N) float32 tensor ``[lse, l_i, l_x, rem, s1d, Q, bT2, cpi, cpx]``.

* ``_rb_grad_kernel``: an elementwise pass over (row, vocabulary) tiles emitting
  ``d loss/d l_m = cd p_m D_m - p_m (ce + cx)`` with ``D_m = r_m - Q`` (evaluated as
  ``bT2 - (1 - r_m)`` where ``r_m >= 1/2``, so neither form cancels), and at ``m = z_t`` /
  ``m = x`` the terms ``ce (1 - p_i) - p_i cx`` / ``cx (1 - p_x) - p_x ce`` from the per-row
  ``cpi``, ``cpx``. The per-row coefficients ``cd, ce, cx`` (the upstream gradient folded in)
  are evaluated in float64 by the caller (``duo_fast.ops.rb_loss``).

Nothing of size ``N x K`` is allocated except the gradient itself. This module never imports
duo_fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ._common import cast, interpreting, linear_tile, meta, torch_dtype

__all__ = ["rb_stats", "rb_grad", "rb_logits_linear", "rb_grad_linear", "stats_blocks", "grad_blocks",
           "linear_blocks", "padded_vocab", "NUM_STATS"]

NUM_STATS = 9


@triton.jit
def _log1p_r(x, u, r):
    """log(1 + x) for x >= 0 from ``u = 1 + x`` (rounded) and ``r ~ 1/u``: ``log(u)`` plus the
    first-order correction ``(x - (u - 1)) / u`` for the rounding of ``u`` (a few ulps). The log is
    libdevice's accurate one: the one-instruction ``lg2.approx`` is off by up to 2^-22 absolute
    near 1, which summed over the vocabulary's terms would bias the sum."""
    return tl.log(u) + (x - (u - 1.0)) * r


@triton.jit
def _log1p_minus_x(x, u, r):
    """log1p(x) - x for x >= 0: the series to x^8 below 0.1 (first dropped term < 2.3e-8 relative)."""
    xs = tl.where(x < 0.1, x, 0.0)
    series = xs * xs * (-0.5 + xs * (1.0 / 3 + xs * (-0.25 + xs * (0.2 + xs * (-1.0 / 6 + xs * (1.0 / 7 - xs / 8))))))
    return tl.where(x < 0.1, series, _log1p_r(x, u, r) - x)


@triton.jit
def _stats_pass2(base, cols0, rmask, lse, beta, zt, x0, K, BLOCK_K: tl.constexpr, REM: tl.constexpr):
    """The sums over normalised p, accumulated per lane and reduced once at the end. The two
    excluded sums share one sum over j not in {z_t, x} (their p added back per row)."""
    zero = tl.zeros(cols0.shape, tl.float32) + (lse * 0.0)[:, None]
    a_rem, a_s1d, a_q, a_bt2, a_cp = zero, zero, zero, zero, zero
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        m = rmask[:, None] & (cols < K)
        raw = tl.load(base + cols, mask=m, other=float("-inf")).to(tl.float32)
        p = tl.exp(raw - lse[:, None])
        x = beta[:, None] * p
        u = 1.0 + x
        r = tl.fdiv(1.0, u, ieee_rounding=False)
        a_s1d += _log1p_r(x, u, r)
        if REM:
            a_rem += _log1p_minus_x(x, u, r)
        pr = p * r
        a_q += pr
        a_bt2 += x * pr
        a_cp += tl.where((cols == zt[:, None]) | (cols == x0[:, None]), 0.0, p)
    return tl.sum(a_rem, 1), tl.sum(a_s1d, 1), tl.sum(a_q, 1), tl.sum(a_bt2, 1), tl.sum(a_cp, 1)


@triton.jit
def _rb_stats_kernel(logits_ptr, stride_n, zt_ptr, x0_ptr, beta_ptr, stats_ptr, N, K,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    row_base = logits_ptr + rows.to(tl.int64) * stride_n
    base = row_base[:, None]
    cols0 = tl.arange(0, BLOCK_K)[None, :] + rows[:, None] * 0
    zt = tl.load(zt_ptr + rows, mask=rmask, other=0).to(tl.int32)
    x0 = tl.load(x0_ptr + rows, mask=rmask, other=0).to(tl.int32)
    beta = tl.load(beta_ptr + rows, mask=rmask, other=0.0)
    l_i = tl.load(row_base + zt, mask=rmask, other=0.0).to(tl.float32)    # two scalar loads per row
    l_x = tl.load(row_base + x0, mask=rmask, other=0.0).to(tl.float32)
    # pass 1: log-sum-exp (tile max, then one exp per element)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        logit = tl.load(base + cols, mask=rmask[:, None] & (cols < K), other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(logit, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)               # rows past N
        s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(rmask, m_i + tl.log(s_i), 0.0)
    # pass 2: rem (log1p(x) - x) only where some row of the block has beta <= 1 (a < 1/(K + 1))
    if tl.min(tl.where(rmask, beta, 2.0), 0) <= 1.0:
        rem, s1d, q, bt2, cp = _stats_pass2(base, cols0, rmask, lse, beta, zt, x0, K, BLOCK_K, True)
    else:
        rem, s1d, q, bt2, cp = _stats_pass2(base, cols0, rmask, lse, beta, zt, x0, K, BLOCK_K, False)
    p_i = tl.exp(l_i - lse)
    p_x = tl.exp(l_x - lse)
    ne = zt != x0
    cpi = cp + tl.where(ne, p_x, 0.0)
    cpx = cp + tl.where(ne, p_i, 0.0)
    out = stats_ptr + rows
    tl.store(out, lse, mask=rmask)
    tl.store(out + N, l_i, mask=rmask)
    tl.store(out + 2 * N, l_x, mask=rmask)
    tl.store(out + 3 * N, rem, mask=rmask)
    tl.store(out + 4 * N, s1d, mask=rmask)
    tl.store(out + 5 * N, q, mask=rmask)
    tl.store(out + 6 * N, bt2, mask=rmask)
    tl.store(out + 7 * N, cpi, mask=rmask)
    tl.store(out + 8 * N, cpx, mask=rmask)


@triton.jit
def _grad_tile(raw, rows, cols, rmask, N, zt_ptr, x0_ptr, beta_ptr, stats_ptr, coef_ptr):
    """d loss / d logit of a (rows, cols) tile of float32 logits from the per-row statistics and
    coefficients."""
    zt = tl.load(zt_ptr + rows, mask=rmask, other=0).to(tl.int32)
    x0 = tl.load(x0_ptr + rows, mask=rmask, other=0).to(tl.int32)
    beta = tl.load(beta_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(stats_ptr + rows, mask=rmask, other=0.0)
    q = tl.load(stats_ptr + 5 * N + rows, mask=rmask, other=0.0)
    bt2 = tl.load(stats_ptr + 6 * N + rows, mask=rmask, other=0.0)
    cd = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
    ce = tl.load(coef_ptr + N + rows, mask=rmask, other=0.0)
    cx = tl.load(coef_ptr + 2 * N + rows, mask=rmask, other=0.0)
    ce_c = tl.load(coef_ptr + 3 * N + rows, mask=rmask, other=0.0)       # ce (1 - p_i)
    cx_c = tl.load(coef_ptr + 4 * N + rows, mask=rmask, other=0.0)       # cx (1 - p_x)
    p = tl.exp(raw - lse[:, None])
    x = beta[:, None] * p
    r = tl.fdiv(1.0, 1.0 + x, ieee_rounding=False)
    d = tl.where(r >= 0.5, bt2[:, None] - x * r, r - q[:, None])
    g = cd[:, None] * p * d
    is_i = cols[None, :] == zt[:, None]
    is_x = (cols[None, :] == x0[:, None]) & (zt != x0)[:, None]
    g += tl.where(is_i, ce_c[:, None] - p * cx[:, None],
                  tl.where(is_x, cx_c[:, None] - p * ce[:, None], -p * (ce + cx)[:, None]))
    return g


@triton.jit
def _logits_tile(h_ptr, stride_hn, w_ptr, stride_wk, b_ptr, rows, cols, N, K, D, out_dtype: tl.constexpr,
                 IEEE: tl.constexpr, EMULATE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``h[rows] @ W[cols]^T + b[cols]`` with fp32 accumulation, rounded to ``out_dtype`` as the
    stored logits are, returned in fp32: the forward and the backward compute each logit with the
    same code and block sizes, hence the same bits. Ids past K read W's last row and get the logit
    -inf (p = 0: they add nothing to any sum, and their gradient is 0); rows past N read the last
    row of h and are never stored. No copy of W is padded, and no load has a mask along D when
    BLOCK_D divides it."""
    h_rows = h_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + tl.minimum(cols, K - 1).to(tl.int64)[:, None] * stride_wk
    acc = linear_tile(h_rows, w_rows, D, IEEE, EMULATE, EVEN_D, BLOCK_M, BLOCK_K, BLOCK_D)
    acc += tl.load(b_ptr + cols, mask=cols < K, other=float("-inf")).to(tl.float32)[None, :]
    return cast(acc, out_dtype, EMULATE).to(tl.float32)


@triton.jit
def _rb_logits_kernel(h_ptr, stride_hn, w_ptr, stride_wk, b_ptr, out_ptr, stride_on, N, K, D,
                      IEEE: tl.constexpr, EMULATE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The forward's logits chunk (N, K padded to the tile grid) = h @ W^T + b by :func:`_logits_tile`."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)       # the row blocks of a vocabulary tile side by
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)       # side: W is read from HBM once per chunk
    logit = _logits_tile(h_ptr, stride_hn, w_ptr, stride_wk, b_ptr, rows, cols, N, K, D, out_ptr.dtype.element_ty, IEEE,
                         EMULATE, EVEN_D, BLOCK_M, BLOCK_K, BLOCK_D)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :],
             logit.to(out_ptr.dtype.element_ty), mask=(rows < N)[:, None])


@triton.jit
def _rb_grad_linear_kernel(h_ptr, stride_hn, w_ptr, stride_wk, b_ptr, grad_ptr, stride_gn, zt_ptr, x0_ptr, beta_ptr,
                           stats_ptr, coef_ptr, N, K, D, IEEE: tl.constexpr, EMULATE: tl.constexpr, EVEN_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """d loss / d logits of the chunk, the logits recomputed tile by tile in registers (the same
    bits as the forward's, :func:`_logits_tile`) and never stored."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < N
    logit = _logits_tile(h_ptr, stride_hn, w_ptr, stride_wk, b_ptr, rows, cols, N, K, D, grad_ptr.dtype.element_ty, IEEE,
                         EMULATE, EVEN_D, BLOCK_M, BLOCK_K, BLOCK_D)
    g = _grad_tile(logit, rows, cols, rmask, N, zt_ptr, x0_ptr, beta_ptr, stats_ptr, coef_ptr)
    tl.store(grad_ptr + rows.to(tl.int64)[:, None] * stride_gn + cols[None, :], cast(g, grad_ptr.dtype.element_ty, EMULATE),
             mask=rmask[:, None])


@triton.jit
def _rb_grad_kernel(logits_ptr, stride_n, grad_ptr, stride_gn, zt_ptr, x0_ptr, beta_ptr, stats_ptr, coef_ptr, N, K,
                    EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < N
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    raw = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_n + cols[None, :], mask=mask, other=0.0)
    g = _grad_tile(raw.to(tl.float32), rows, cols, rmask, N, zt_ptr, x0_ptr, beta_ptr, stats_ptr, coef_ptr)
    tl.store(grad_ptr + rows.to(tl.int64)[:, None] * stride_gn + cols[None, :], cast(g, grad_ptr.dtype.element_ty, EMULATE),
             mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _interpret(interpret: bool | None) -> bool:
    return interpreting() if interpret is None else interpret


def stats_blocks(K: int, interpret: bool | None = None) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_K vocabulary chunk) of the stats kernel: 2k-element tiles on a GPU
    (eight elements per thread at 8 warps, five per-lane accumulators), one row per program when
    K >= 2048 so that a row (100 KB at K = 50257, bf16) is still in L2 for the second pass;
    64k-element tiles in the interpreter (fewer Python programs)."""
    if _interpret(interpret):
        block_k = min(2048, triton.next_power_of_2(max(K, 16)))
        return max(1, min(1024, 65536 // block_k)), block_k
    block_k = min(2048, max(32, triton.next_power_of_2(K)))
    return 2048 // block_k, block_k


def grad_blocks(K: int, interpret: bool | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of the elementwise gradient kernel."""
    if _interpret(interpret):
        block_k = min(4096, triton.next_power_of_2(max(K, 16)))
        return max(1, min(1024, 131072 // block_k)), block_k
    block_k = 512 if K >= 512 else 64
    return 2048 // block_k, block_k


def _check_rows(logits: torch.Tensor, zt: torch.Tensor, x0: torch.Tensor, beta: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be 2-d with unit stride along the vocabulary")
    N = logits.shape[0]
    for name, t in (("zt", zt), ("x0", x0), ("beta", beta)):
        if t.shape != (N,) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with shape ({N},), got {tuple(t.shape)}")
    if beta.dtype != torch.float32:
        raise ValueError("beta must be float32")


def rb_stats(logits: torch.Tensor, zt: torch.Tensor, x0: torch.Tensor, beta: torch.Tensor,
             blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """logits (N, K) fp32/bf16/fp16; zt, x0 (N,) int64; beta (N,) float32 = K a/(1 - a).
    Returns the (9, N) float32 statistics described in the module docstring."""
    _check_rows(logits, zt, x0, beta)
    N, K = logits.shape
    stats = torch.empty((NUM_STATS, N), dtype=torch.float32, device=logits.device)
    if N == 0:
        return stats
    bm, bk = blocks or stats_blocks(K)
    _rb_stats_kernel[(triton.cdiv(N, bm),)](logits, logits.stride(0), zt, x0, beta, stats, N, K, BLOCK_M=bm,
                                           BLOCK_K=bk, num_warps=8)
    return stats


def rb_grad(logits: torch.Tensor, zt: torch.Tensor, x0: torch.Tensor, beta: torch.Tensor, stats: torch.Tensor,
            coefs: torch.Tensor, out: torch.Tensor | None = None, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """d loss/d logits (N, K) in the logits' dtype. ``stats`` from :func:`rb_stats`; ``coefs``
    (5, N) float32 ``[cd, ce, cx, ce (1 - p_i), cx (1 - p_x)]``. ``out`` may be ``logits``
    itself (each element is read before it is written by the same program)."""
    _check_rows(logits, zt, x0, beta)
    N, K = logits.shape
    if stats.shape != (NUM_STATS, N) or coefs.shape != (5, N) or not (stats.is_contiguous() and coefs.is_contiguous()):
        raise ValueError("stats must be (9, N) and coefs (5, N), contiguous float32")
    if out is None:
        out = torch.empty_like(logits)
    if out.shape != logits.shape or out.stride(1) != 1:
        raise ValueError("out must have the logits' shape and unit stride along the vocabulary")
    if N == 0:
        return out
    bm, bk = blocks or grad_blocks(K)
    _rb_grad_kernel[(triton.cdiv(N, bm), triton.cdiv(K, bk))](logits, logits.stride(0), out, out.stride(0), zt, x0,
                                                              beta, stats, coefs, N, K, EMULATE=interpreting(),
                                                              BLOCK_M=bm, BLOCK_K=bk, num_warps=4)
    return out


def linear_blocks(D: int, ieee: bool, interpret: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_M tokens, BLOCK_K vocabulary ids, BLOCK_D) of the logits and fused-gradient
    kernels: 128 x 128 tiles stepping 128 along D on tensor cores (8 warps; by the cost model the
    fused gradient's epilogue costs 1.4x the issue slots at 128 x 64 and 64-wide steps add 5%, and
    no tile spills), 64 x 64 tiles with 32-wide steps for the IEEE fp32 product; large tiles in the
    interpreter. BLOCK_K divides the padded vocabulary (a multiple of 128)."""
    if _interpret(interpret):
        return 128, 128, min(128, triton.next_power_of_2(max(D, 16)))
    if ieee:
        return 64, 64, 32 if D >= 32 else 16
    return 128, 128, 128 if D >= 128 else 64 if D >= 64 else 16


def _check_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[int, int, int]:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or h.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"need h (N, D) and weight (K, D) with unit stride along D, got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}")
    if h.dtype != weight.dtype or bias.shape != (weight.shape[0],) or not bias.is_contiguous():
        raise ValueError("h and weight must share a dtype, and bias be contiguous (K,)")
    return h.shape[0], weight.shape[0], h.shape[1]


def padded_vocab(K: int) -> int:
    """Columns of the logits and gradient chunks of the fused kernels: K rounded up to 128 (every
    tile width divides it; rows stay aligned for vector loads)."""
    return -(-K // 128) * 128


def _out(h: torch.Tensor, K: int, out: torch.Tensor | None) -> torch.Tensor:
    N, Kp = h.shape[0], padded_vocab(K)
    if out is None:
        return torch.empty((N, Kp), dtype=h.dtype, device=h.device)
    if out.shape != (N, Kp) or out.stride(1) != 1 or out.dtype != h.dtype:
        raise ValueError(f"out must be ({N}, {Kp}) {h.dtype} with unit stride along the vocabulary")
    return out


def _launch_linear(kernel: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
                   rows: tuple, blocks: tuple[int, int, int] | None) -> torch.Tensor:
    """Launch a logits-tile kernel over (row blocks, vocabulary tiles of ``out``); ``rows``: the
    per-row arguments between ``stride_on`` and ``N``."""
    N, K, D = h.shape[0], weight.shape[0], h.shape[1]
    if N == 0:
        return out
    ieee = h.dtype == torch.float32
    bm, bk, bd = blocks or linear_blocks(D, ieee)
    kernel[(triton.cdiv(N, bm), out.shape[1] // bk)](
        h, h.stride(0), weight, weight.stride(0), bias, out, out.stride(0), *rows, N, K, D, IEEE=ieee,
        EMULATE=interpreting(), EVEN_D=D % bd == 0, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, num_warps=8 if bm == 128 else 4)
    return out


def rb_logits_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None,
                     blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """logits (N, padded_vocab(K)) = h @ weight^T + bias in h's dtype (fp32 accumulation), -inf in the
    padded columns: what :func:`rb_grad_linear` recomputes, bit for bit."""
    _, K, _ = _check_linear(h, weight, bias)
    return _launch_linear(_rb_logits_kernel, h, weight, bias, _out(h, K, out), (), blocks)


def rb_grad_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, zt: torch.Tensor, x0: torch.Tensor,
                   beta: torch.Tensor, stats: torch.Tensor, coefs: torch.Tensor, out: torch.Tensor | None = None,
                   blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """d loss / d logits (N, padded_vocab(K)) in h's dtype (0 in the padded columns), the logits of
    :func:`rb_logits_linear` recomputed in registers; ``stats``, ``coefs`` as for :func:`rb_grad`."""
    N, K, _ = _check_linear(h, weight, bias)
    for name, t in (("zt", zt), ("x0", x0), ("beta", beta)):
        if t.shape != (N,) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with shape ({N},), got {tuple(t.shape)}")
    if stats.shape != (NUM_STATS, N) or coefs.shape != (5, N) or not (stats.is_contiguous() and coefs.is_contiguous()):
        raise ValueError("stats must be (9, N) and coefs (5, N), contiguous float32")
    return _launch_linear(_rb_grad_linear_kernel, h, weight, bias, _out(h, K, out), (zt, x0, beta, stats, coefs),
                          blocks)


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for duo_fast.tools.compile_check (meta tensors: nothing runs)
# ---------------------------------------------------------------------------------------------

def compile_calls() -> list[tuple[str, Callable[[], Any]]]:
    """Every (BLOCK_M, BLOCK_K) of kernels/rb_loss.py's launchers in fp32, bf16 and fp16, at a
    chunk of the production shape (the op's GPU chunk of GPT-2 logits) and at small vocabularies."""
    import torch

    from . import gemm
    from . import rb_loss as rb

    out = []

    def call(N: int, K: int, dt: str, grad: bool) -> Callable[[], Any]:
        def run() -> Any:
            logits, z = meta(N, K, dtype=torch_dtype(dt)), meta(N, dtype=torch.int64)
            beta = meta(N, dtype=torch.float32)
            if grad:
                return rb.rb_grad(logits, z, z, beta, meta(9, N, dtype=torch.float32), meta(5, N, dtype=torch.float32),
                                  out=logits)
            return rb.rb_stats(logits, z, z, beta)
        return run

    def linear_call(N: int, K: int, D: int, dt: str, what: str) -> Callable[[], Any]:
        def run() -> Any:
            h, w, b = meta(N, D, dtype=torch_dtype(dt)), meta(K, D, dtype=torch_dtype(dt)), meta(K, dtype=torch_dtype(dt))
            Kp = rb.padded_vocab(K)
            if what == "logits":
                return rb.rb_logits_linear(h, w, b)
            if what == "grad":
                z, beta = meta(N, dtype=torch.int64), meta(N, dtype=torch.float32)
                return rb.rb_grad_linear(h, w, b, z, z, beta, meta(9, N, dtype=torch.float32),
                                         meta(5, N, dtype=torch.float32))
            return gemm.matmul(meta(N, Kp, dtype=torch_dtype(dt)).t(), h, meta(K, D, dtype=torch.float32), True,
                               ieee=dt == "fp32")
        return run

    for K in sorted({2**i for i in range(1, 17)} | {50257}):
        for dt in ("fp32", "bf16", "fp16"):
            N = 2560 if K == 50257 else 1000
            out.append((f"stats {dt} K={K}", call(N, K, dt, False)))
            out.append((f"grad {dt} K={K}", call(N, K, dt, True)))
    # the fused-projection path of rb_loss_linear: logits, logits + gradient, dW += dlogits^T h
    for dt in ("fp32", "bf16", "fp16"):
        for N, K, D in ((2560, 50257, 768), (1024, 50257, 768), (100, 300, 70), (37, 20, 20)):
            for what in ("logits", "grad", "dW"):
                out.append((f"linear {what} {dt} N={N} K={K} D={D}", linear_call(N, K, D, dt, what)))
    return out
