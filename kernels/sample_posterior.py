"""Triton kernels: exact posterior sampling (docs/math.md section 2).

For each token (a row of the logits), one streaming pass over the vocabulary keeps an online
log-sum-exp, a draw from ``x_theta`` and the logit at ``z_t``. The posterior is then the
mixture "draw from x_theta" / "draw uniformly" / "stay at z_t" with weights ``A = a_s - a_t``,
``Bu = (a_s - a_t)(1 - a_s)/a_s`` and ``C = a_t K x_theta[z_t] + a_t (1 - a_s)/a_s`` (the
section's ``1 - a_ts`` and ``a_ts - a_t`` rewritten without cancellation), evaluated in float64.
The Psi sampler mixes in ``a_s q0 + (1 - a_s)/K`` with ``q0`` the posterior at ``s = 0``: the
same three parts with other weights. No ``B x L x K`` temporary exists.

The draw from ``x_theta``:

- **fused-linear kernel**: Gumbel-argmax of ``logits + g``, one Gumbel per id (the logits exist
  only as tiles of the GEMM, so a second look at a few of them would cost a GEMM).
- **logits kernel**, by groups (docs/math.md section 2, "two-level draw"): the ids are cut into
  fixed groups of 128; the pass draws a group by Gumbel-argmax of the groups' log-masses (one
  Gumbel per group), then re-reads the chosen group's 128 logits and draws an id among them by
  Gumbel-argmax (one Gumbel per id of that group). P(id) = P(group) P(id | group), exactly; 1/128
  of the random numbers of one Gumbel per id, which is what made this kernel compute-bound. The
  groups of a block of ``128 NJ`` ids (:func:`draw_block`, a function of K alone) interleave:
  group ``j`` is ``{16 NJ a + 16 j + l: a < 8, l < 16}``, so that each thread of the pass holds
  its group's ids itself (sums without shuffles).

Randomness: Philox keyed by ``seed``; the per-id Gumbel of id ``c`` of a row takes word
``c % 4`` of counter ``(c // 4, row, 0, 0)`` (stream 0: all four words of each call are used),
the same whatever the block sizes; the group Gumbel of group ``g`` is word 0 of
``(g, row, 2, 0)`` (stream 2). A Gumbel is ``-log E`` with ``E = exponential32`` of one Philox
word (26 nats of range: no id within 25 nats of the top is ever excluded). The kernels work in
base 2 (logits times ``log2(e)``, ``exp2``, ``lg2_approx``: one MUFU instruction per log or exp,
no ``ln 2`` scalings); the Gumbel-argmax ``l log2(e) - log2(log2(e) E)`` is the natural-base one
scaled by ``log2(e)`` and shifted by a constant, the same draw (and a group's score
``log2(mass) - log2(log2(e) E)`` likewise). The mixture uniform has 53 bits; the uniform id
uses ``(r * K) >> 32`` (relative bias at most ``K / 2^32``).

``FINAL``, the kind of step: ``POSTERIOR`` (the posterior at ``(a_s, a_t)``), ``ANCESTRAL`` (the
final step with ``a_s = 1``) or ``GREEDY`` (``argmax logits``). This module never imports duo_fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ._common import exponential32_log2e, interpreting, lg2_approx, linear_tile, meta, torch_dtype

__all__ = ["POSTERIOR", "ANCESTRAL", "GREEDY",
           "sample_posterior_fwd", "sample_posterior_linear_fwd", "nucleus_cut_fwd", "logits_blocks", "linear_blocks",
           "draw_block"]

POSTERIOR = tl.constexpr(0)        # the kinds of step (FINAL)
ANCESTRAL = tl.constexpr(1)
GREEDY = tl.constexpr(2)
_GUMBEL_STREAM = tl.constexpr(0)   # Philox counter word 2 of each stream (module docstring)
_MIX_STREAM = tl.constexpr(1)
_GROUP_STREAM = tl.constexpr(2)
_LOG2E = tl.constexpr(1.4426950408889634)
_GROUP = tl.constexpr(128)          # ids per group of the logits kernel's two-level draw


@triton.jit
def _mixture_choice(best, zt, x_i, a_s, a_t, kappa, row, seed, K, FINAL: tl.constexpr, USE_PSI: tl.constexpr):
    """Pick among (best: a draw from x_theta, a uniform id, zt) with the posterior's weights.
    x_i, a_s, a_t, kappa: float64 per row; best, zt, row: int32 per row."""
    Kf = K.to(tl.float64)
    if FINAL == ANCESTRAL:
        a_s = a_s * 0.0 + 1.0
    A = a_s - a_t
    Bu = (a_s - a_t) / a_s * (1.0 - a_s)
    C = a_t * Kf * x_i + a_t * (1.0 - a_s) / a_s
    Z = A + Bu + C
    w_model = A / Z
    w_unif = Bu / Z
    if USE_PSI:
        z0 = (1.0 - a_t) + a_t * Kf * x_i            # normaliser of q0 (the posterior at s = 0)
        w_model = kappa * w_model + (1.0 - kappa) * a_s * (1.0 - a_t) / z0
        w_unif = kappa * w_unif + (1.0 - kappa) * (1.0 - a_s)
    zero = row * 0
    r0, r1, r2, _ = tl.philox(seed, zero, row, zero + _MIX_STREAM, zero)      # per-row draws
    hi = (r0 >> 5).to(tl.int64)                                     # 27 bits
    lo = (r1 >> 6).to(tl.int64)                                     # 26 bits
    u = ((hi * 67108864 + lo).to(tl.float64) + 0.5) * (1.0 / 9007199254740992.0)
    uni = ((r2.to(tl.uint64) * K.to(tl.uint64)) >> 32).to(tl.int32)
    return tl.where(u < w_model, best, tl.where(u < w_model + w_unif, uni, zt))


@triton.jit
def _gumbel_words(seed, c0, c1, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gumbel noise in base 2 (``-log2(log2(e) E)``, float32) of a (BLOCK_M, BLOCK_K) tile whose
    column ``4j + t`` takes word ``t`` of Philox counter ``(c0[:, j], c1[:, j], 0, 0)``."""
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c0 * 0 + _GUMBEL_STREAM, c0 * 0)
    g0 = -lg2_approx(exponential32_log2e(r0))
    g1 = -lg2_approx(exponential32_log2e(r1))
    g2 = -lg2_approx(exponential32_log2e(r2))
    g3 = -lg2_approx(exponential32_log2e(r3))
    # element [n, j, p, q] of the double join is word 2p + q: flattened, column 4j + t gets word t
    return tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, g3)), (BLOCK_M, BLOCK_K))


@triton.jit
def _gumbel_tile(seed, rows, k0, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gumbel noise of the (rows, k0 + [0, BLOCK_K)) tile in base 2, float32. Vocabulary index
    ``c`` uses word ``c % 4`` of Philox counter ``(c // 4, row, 0, 0)`` (stream 0): one Philox
    call per four ids, the same noise whatever the block sizes (``k0`` and ``BLOCK_K``
    multiples of 4)."""
    j = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    return _gumbel_words(seed, j[None, :] + rows[:, None] * 0, rows[:, None] + j[None, :] * 0, BLOCK_M, BLOCK_K)


@triton.jit
def _initial_state(BLOCK: tl.constexpr):
    """Running state of BLOCK rows: (max, sum of exp, best score, best id, logit at z_t)."""
    return (tl.full((BLOCK,), float("-inf"), tl.float32), tl.zeros((BLOCK,), tl.float32),
            tl.full((BLOCK,), float("-inf"), tl.float32), tl.zeros((BLOCK,), tl.int32), tl.zeros((BLOCK,), tl.float32))


@triton.jit
def _online_update(logit, k0, cols, rows, zt, m_i, s_i, best_v, best_i, l_i, seed, FINAL: tl.constexpr):
    """Fold one (rows, vocabulary chunk) tile of logits into the per-row running state:
    online log-sum-exp in base 2 (m_i, s_i), Gumbel-argmax (best_v, best_i; plain argmax when
    greedy) and the logit at z_t (l_i). logit: (BLOCK_M, BLOCK_K) float32, times log2(e) unless
    greedy, -inf outside the vocabulary; cols = k0 + [0, BLOCK_K)."""
    m_new = tl.maximum(m_i, tl.max(logit, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)          # rows still all -inf (nucleus-filtered)
    s_i = s_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(logit - m_ref[:, None]), 1)
    if FINAL == GREEDY:
        score = logit
    else:
        score = logit + _gumbel_tile(seed, rows, k0, logit.shape[0], logit.shape[1])
    blk_v = tl.max(score, 1)
    blk_i = tl.argmax(score, 1).to(tl.int32) + k0
    take = blk_v > best_v
    best_i = tl.where(take, blk_i, best_i)
    best_v = tl.where(take, blk_v, best_v)
    l_i += tl.sum(tl.where(cols[None, :] == zt[:, None], logit, 0.0), 1)
    return m_new, s_i, best_v, best_i, l_i


@triton.jit
def _drawn_logit(raw, ok, cut, FINAL: tl.constexpr):
    """The logit the logits kernel's draw sees, the same bits in both passes and at z_t: times
    log2(e) (not when greedy), -inf where not ``ok`` or below the row's nucleus ``cut``."""
    if FINAL != GREEDY:
        scaled = raw * _LOG2E
    else:
        scaled = raw
    return tl.where(ok & (raw >= cut[:, None]), scaled, float("-inf"))


@triton.jit
def _grouped_update(logit, k0, rows, m_i, s_i, best_v, best_g, seed):
    """As :func:`_online_update` (without the logit at z_t, read once by the caller) for the logits
    kernel's draw by groups (module docstring): the
    Gumbel-argmax is over the groups' log-masses ``log2(sum of exp2(logit))`` (one Gumbel per
    group, stream 2), ``best_g`` a global group index. The tile is one block of
    ``BLOCK_K = 128 NJ`` ids; its group ``j`` holds ids ``k0 + 16 NJ a + 16 j + l`` (a < 8,
    l < 16), so that the threads laid along the ids each hold a group's ids for themselves."""
    BLOCK_M: tl.constexpr = logit.shape[0]
    NJ: tl.constexpr = logit.shape[1] // _GROUP
    m_new = tl.maximum(m_i, tl.max(logit, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2(logit - m_ref[:, None])
    g_mass = tl.sum(tl.sum(tl.reshape(e, (BLOCK_M, 8, NJ, 16)), 1), 2)   # (BLOCK_M, NJ), relative to 2^m_ref
    s_i = s_i * tl.exp2(m_i - m_ref) + tl.sum(g_mass, 1)
    g = (k0 // logit.shape[1]) * NJ + tl.arange(0, NJ)
    c0 = g[None, :] + rows[:, None] * 0
    r0, _, _, _ = tl.philox(seed, c0, rows[:, None] + g[None, :] * 0, c0 * 0 + _GROUP_STREAM, c0 * 0)
    score = m_ref[:, None] + lg2_approx(g_mass) - lg2_approx(exponential32_log2e(r0))
    blk_v = tl.max(score, 1)
    blk_g = tl.argmax(score, 1).to(tl.int32) + (k0 // logit.shape[1]) * NJ
    take = blk_v > best_v
    best_g = tl.where(take, blk_g, best_g)
    best_v = tl.where(take, blk_v, best_v)
    return m_new, s_i, best_v, best_g


@triton.jit
def _draw_in_group(base, rows, rmask, best_g, cut, K, seed, BLOCK_K: tl.constexpr):
    """Second pass of the draw by groups: Gumbel-argmax (stream 0, the per-id noise) over the
    128 logits of each row's chosen group (ids ``k0 + 16 NJ a + 16 j + l``), re-read."""
    NJ: tl.constexpr = BLOCK_K // _GROUP
    q = tl.arange(0, _GROUP // 4)                             # quads of ids (a, l // 4)
    first = (best_g // NJ) * BLOCK_K + (best_g % NJ) * 16      # (BLOCK_M,) the group's first id
    quad = first[:, None] + (q // 4)[None, :] * (16 * NJ) + (q % 4)[None, :] * 4
    ids = tl.reshape(tl.join(tl.join(quad, quad + 2), tl.join(quad + 1, quad + 3)), (quad.shape[0], _GROUP))
    ok = rmask[:, None] & (ids < K)
    raw = tl.load(base + ids, mask=ok, other=0.0).to(tl.float32)
    logit = _drawn_logit(raw, ok, cut, 0)
    score = logit + _gumbel_words(seed, quad // 4, rows[:, None] + quad * 0, quad.shape[0], _GROUP)
    return tl.max(tl.where(score == tl.max(score, 1)[:, None], ids, -1), 1)


@triton.jit
def _finish(rows, rmask, zt, m_i, s_i, best_i, l_i, a_s_ptr, a_t_ptr, kappa_ptr, out_ptr, seed, K,
            FINAL: tl.constexpr, USE_PSI: tl.constexpr):
    if FINAL == GREEDY:
        out = best_i
    else:
        x_i = tl.exp2(l_i - (m_i + tl.log2(s_i))).to(tl.float64)     # x_theta[z_t] (base-2 state)
        a_t = tl.load(a_t_ptr + rows, mask=rmask, other=0.5)
        a_s = tl.load(a_s_ptr + rows, mask=rmask, other=1.0)
        kappa = a_t
        if USE_PSI:
            kappa = tl.load(kappa_ptr + rows, mask=rmask, other=1.0)
        out = _mixture_choice(best_i, zt, x_i, a_s, a_t, kappa, rows, seed, K, FINAL, USE_PSI)
    tl.store(out_ptr + rows, out.to(tl.int64), mask=rmask)


# one compile whatever the seed; the row stride is not specialised either, so rows are never
# taken as 16-byte aligned: scalar loads, with each thread holding ids 256 apart, whatever K is
# (the layout the interleaved groups are summed in without shuffles; vectorised rows would put
# a group across warps: 4.8 instead of 3.2 ms at the small preset, cost model)
@triton.jit(do_not_specialize=["seed", "stride_n"])
def _sample_posterior_kernel(logits_ptr, stride_n, zt_ptr, a_s_ptr, a_t_ptr, kappa_ptr, cut_ptr, out_ptr, N, K,
                             seed: tl.int64, seed_ptr, FINAL: tl.constexpr, USE_PSI: tl.constexpr,
                             HAS_CUT: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    if SEED_FROM_PTR:                       # a device tensor: new values per CUDA-graph replay
        seed = tl.load(seed_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    base = logits_ptr + rows.to(tl.int64)[:, None] * stride_n
    zt = tl.load(zt_ptr + rows, mask=rmask, other=0).to(tl.int32)
    cut = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    if HAS_CUT:                             # nucleus: only logits >= the row's cut take part
        cut = tl.load(cut_ptr + rows, mask=rmask, other=float("-inf"))
    m_i, s_i, best_v, best_i, l_i = _initial_state(BLOCK_M)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        raw = tl.load(base + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        logit = _drawn_logit(raw, cmask[None, :], cut, FINAL)
        if FINAL == GREEDY:
            m_i, s_i, best_v, best_i, l_i = _online_update(logit, k0, cols, rows, zt, m_i, s_i, best_v, best_i, l_i,
                                                           seed, FINAL)
        else:
            m_i, s_i, best_v, best_i = _grouped_update(logit, k0, rows, m_i, s_i, best_v, best_i, seed)
    if FINAL != GREEDY:
        best_i = _draw_in_group(base, rows, rmask, best_i, cut, K, seed, BLOCK_K)
        raw_zt = tl.load(base + zt[:, None], mask=rmask[:, None], other=0.0).to(tl.float32)
        l_i = tl.sum(_drawn_logit(raw_zt, rmask[:, None], cut, FINAL), 1)           # the logit at z_t
    _finish(rows, rmask, zt, m_i, s_i, best_i, l_i, a_s_ptr, a_t_ptr, kappa_ptr, out_ptr, seed, K, FINAL, USE_PSI)


@triton.jit
def _order_key(x):
    """float32 -> int64 with the order of the floats (sign-magnitude bits to two's complement)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _nucleus_cut_kernel(logits_ptr, stride_n, cut_ptr, N, K, top_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row, the nucleus cut without a sort: the smallest logit ``c`` such that the softmax
    mass of the logits strictly above ``c`` is <= top_p (the public rule: an id is kept when the
    mass sorted before it is <= top_p). A bisection over the 2^32 order keys of float32 (33
    halvings, exact): ``S(v) = mass of keys > v`` only changes at the row's keys, so the smallest
    ``v`` with ``S(v) <= top_p`` is a logit of the row. Masses are summed per tile in float32 and
    across tiles in float64."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    base = logits_ptr + rows.to(tl.int64)[:, None] * stride_n
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):                                  # log-sum-exp of the row
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = rmask[:, None] & (cols < K)[None, :]
        x = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), 1)
        m_i = m_new
    lse = tl.where(rmask, m_i + tl.log(tl.where(rmask, s_i, 1.0)), 0.0)
    lo = tl.full((BLOCK_M,), -2147483649, tl.int64)                  # below every key: S(lo) = 1 > top_p
    hi = tl.where(rmask, _order_key(tl.where(rmask, m_i, 0.0)), 0)   # the row's maximum: S(hi) = 0
    for _ in range(33):
        mid = lo + (hi - lo) // 2
        above = tl.zeros((BLOCK_M,), tl.float64)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = rmask[:, None] & (cols < K)[None, :]
            x = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            p = tl.where(_order_key(x) > mid[:, None], tl.exp(x - lse[:, None]), 0.0)
            above += tl.sum(p, 1).to(tl.float64)
        fits = above <= top_p
        hi = tl.where(fits, mid, hi)
        lo = tl.where(fits, lo, mid)
    bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.int32)
    tl.store(cut_ptr + rows, bits.to(tl.float32, bitcast=True), mask=rmask)


@triton.jit(do_not_specialize=["seed"])       # one compile whatever the seed
def _sample_posterior_linear_kernel(h_ptr, stride_hn, w_ptr, stride_wk, b_ptr, zt_ptr, a_s_ptr, a_t_ptr, kappa_ptr,
                                    out_ptr, N, K, D, seed: tl.int64, seed_ptr, HAS_BIAS: tl.constexpr, FINAL: tl.constexpr,
                                    USE_PSI: tl.constexpr, IEEE: tl.constexpr, EMULATE: tl.constexpr,
                                    SEED_FROM_PTR: tl.constexpr, EVEN_D: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    zt = tl.load(zt_ptr + rows, mask=rmask, other=0).to(tl.int32)
    m_i, s_i, best_v, best_i, l_i = _initial_state(BLOCK_N)
    # rows past N and ids past K read the last valid row (their results are masked): no row or
    # column masks in the GEMM loop, and none along D when BLOCK_D divides it
    h_rows = h_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_hn
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        w_rows = w_ptr + tl.minimum(cols, K - 1).to(tl.int64)[:, None] * stride_wk
        acc = linear_tile(h_rows, w_rows, D, IEEE, EMULATE, EVEN_D, BLOCK_N, BLOCK_K, BLOCK_D)   # h @ W_chunk^T
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if FINAL != GREEDY:                                                  # base 2 (as the logits kernel rounds it)
            acc = acc * _LOG2E
        logit = tl.where(cmask[None, :], acc, float("-inf"))
        m_i, s_i, best_v, best_i, l_i = _online_update(logit, k0, cols, rows, zt, m_i, s_i, best_v, best_i, l_i, seed,
                                                       FINAL)
    _finish(rows, rmask, zt, m_i, s_i, best_i, l_i, a_s_ptr, a_t_ptr, kappa_ptr, out_ptr, seed, K, FINAL, USE_PSI)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def draw_block(K: int) -> int:
    """The id block of the logits kernel's draw by groups, a function of K alone (so the draws do
    not depend on the launch configuration): ``128 NJ`` ids, NJ groups of 128."""
    return min(2048, triton.next_power_of_2(max(K, _GROUP.value)))


def logits_blocks(K: int, interpret: bool | None = None) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_K ids) of the logits kernel; BLOCK_K is :func:`draw_block`. A GPU
    gets tiles of 4k-8k elements; the interpreter (TRITON_INTERPRET=1) runs programs one after
    another in Python, so there it gets tiles of 64k elements (fewer programs, same results)."""
    if interpret is None:
        interpret = interpreting()
    block_k = draw_block(K)
    if interpret:
        return max(1, min(1024, 65536 // block_k)), block_k
    # (each configuration is compiled and checked for sm_90 in CI): 4 rows, 32 logits per thread
    # (8 warps at block_k 2048): no spills; more rows would make the second pass's tile of
    # rows x 128 re-read logits and their noise spill at small K
    return 4, block_k


def _logits_warps(block_m: int, block_k: int) -> int:
    """Warps of a logits-kernel launch: 32 logits per thread, 1 to 8 warps."""
    return max(1, min(8, block_m * block_k // 1024))


def linear_blocks(N: int, K: int, D: int, interpret: bool | None = None, ieee: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D) of the fused-linear kernel (tensor-core friendly, >= 16); the
    interpreter gets large tiles, as in :func:`logits_blocks`. ``ieee``: fp32 operands, whose
    exact product runs on the FMA units and needs a thinner step along D (no spills)."""
    if interpret is None:
        interpret = interpreting()
    if interpret:
        return 256, min(256, triton.next_power_of_2(max(K, 16))), min(128, triton.next_power_of_2(max(D, 16)))
    if ieee:
        return (128 if N >= 128 else 64 if N >= 64 else 16), (64 if K >= 64 else 16), (32 if D >= 32 else 16)
    # 128 x 64 tiles, 8 warps, 128-wide steps along D when they divide it (no masks, half the loop
    # overhead of 64): no spills, the fewest instructions per logit (cost model)
    block_n = 128 if N >= 128 else 64 if N >= 64 else 16
    block_k = 64 if K >= 64 else 16
    block_d = 128 if D % 128 == 0 else 64 if D >= 64 else 16
    return block_n, block_k, block_d


def _check_rows(zt: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor, kappa: torch.Tensor | None, N: int) -> None:
    for name, t in (("zt", zt), ("a_s", a_s), ("a_t", a_t)) + ((("kappa", kappa),) if kappa is not None else ()):
        if t.shape != (N,) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with shape ({N},), got {tuple(t.shape)}")
    if a_s.dtype != torch.float64 or a_t.dtype != torch.float64 or (kappa is not None and kappa.dtype != torch.float64):
        raise ValueError("a_s, a_t and kappa must be float64")


def _seed_args(seed: int | torch.Tensor, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """(scalar seed, seed pointer): a one-element int64 device tensor is read by the kernel (so a
    captured CUDA graph draws new noise when the tensor is refilled before a replay)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != device:
            raise ValueError(f"a tensor seed must be one int64 element on {device}")
        return 0, seed
    return int(seed), None


def nucleus_cut_fwd(logits: torch.Tensor, top_p: float, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """logits (N, K) fp32/bf16/fp16 with unit stride along K -> (N,) float32 cut: the nucleus of
    a row is its logits >= the cut (no sort: a bisection over float32 order keys)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be 2-d with unit stride along the vocabulary")
    if not 0 < top_p < 1:
        raise ValueError(f"top_p must be in (0, 1), got {top_p}")
    N, K = logits.shape
    cut = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return cut
    block_m, block_k = blocks or logits_blocks(K)
    _nucleus_cut_kernel[(triton.cdiv(N, block_m),)](logits, logits.stride(0), cut, N, K, float(top_p),
                                                     BLOCK_M=block_m, BLOCK_K=block_k,
                                                     num_warps=_logits_warps(block_m, block_k))
    return cut


def sample_posterior_fwd(logits: torch.Tensor, zt: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor,
                         kappa: torch.Tensor | None, seed: int | torch.Tensor, final: int,
                         blocks: tuple[int, int] | None = None, cut: torch.Tensor | None = None) -> torch.Tensor:
    """logits (N, K) fp32/bf16/fp16 with unit stride along K; zt (N,) int64; a_s, a_t, kappa
    (N,) float64; seed: an int, or a one-element int64 tensor on the logits' device; ``blocks``
    overrides (BLOCK_M, BLOCK_K); ``cut`` (N,) float32: only logits >= cut take part (the
    nucleus of :func:`nucleus_cut_fwd`). Returns z_s (N,) int64."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be 2-d with unit stride along the vocabulary")
    N, K = logits.shape
    _check_rows(zt, a_s, a_t, kappa, N)
    out = torch.empty(N, dtype=torch.int64, device=logits.device)
    if N == 0:
        return out
    block_m, block_k = blocks or logits_blocks(K)
    if block_k != draw_block(K):
        raise ValueError(f"BLOCK_K must be draw_block(K) = {draw_block(K)} (the draw's groups), got {block_k}")
    seed, seed_ptr = _seed_args(seed, logits.device)
    _sample_posterior_kernel[(triton.cdiv(N, block_m),)](
        logits, logits.stride(0), zt, a_s, a_t, kappa if kappa is not None else a_t,
        cut if cut is not None else a_t, out, N, K, seed, seed_ptr if seed_ptr is not None else zt, FINAL=final,
        USE_PSI=kappa is not None, HAS_CUT=cut is not None, SEED_FROM_PTR=seed_ptr is not None, BLOCK_M=block_m,
        BLOCK_K=block_k, num_warps=_logits_warps(block_m, block_k))
    return out


def sample_posterior_linear_fwd(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, zt: torch.Tensor,
                                a_s: torch.Tensor, a_t: torch.Tensor, kappa: torch.Tensor | None,
                                seed: int | torch.Tensor, final: int) -> torch.Tensor:
    """h (N, D), weight (K, D), bias (K,) or None, same dtype (fp32 uses IEEE fp32 dots, bf16/fp16
    tensor cores with fp32 accumulation). Returns z_s (N,) int64."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"need h (N, D) and weight (K, D), got {tuple(h.shape)} and {tuple(weight.shape)}")
    if h.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("h and weight need unit stride along D")
    if h.dtype != weight.dtype:
        raise ValueError(f"h is {h.dtype} but weight is {weight.dtype}")
    N, D = h.shape
    K = weight.shape[0]
    if bias is not None and bias.shape != (K,):
        raise ValueError(f"bias must be ({K},), got {tuple(bias.shape)}")
    _check_rows(zt, a_s, a_t, kappa, N)
    out = torch.empty(N, dtype=torch.int64, device=h.device)
    if N == 0:
        return out
    bn, bk, bd = linear_blocks(N, K, D, ieee=h.dtype == torch.float32)
    seed, seed_ptr = _seed_args(seed, h.device)
    _sample_posterior_linear_kernel[(triton.cdiv(N, bn),)](
        h, h.stride(0), weight, weight.stride(0), bias if bias is not None else weight, zt, a_s, a_t,
        kappa if kappa is not None else a_t, out, N, K, D, seed, seed_ptr if seed_ptr is not None else zt,
        HAS_BIAS=bias is not None, FINAL=final, USE_PSI=kappa is not None, IEEE=h.dtype == torch.float32,
        EMULATE=interpreting(),
        SEED_FROM_PTR=seed_ptr is not None, EVEN_D=D % bd == 0, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd,
        num_warps=8 if bn == 128 else 4)
    return out


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for duo_fast.tools.compile_check (meta tensors: nothing runs)
# ---------------------------------------------------------------------------------------------

def compile_calls() -> list[tuple[str, Callable[[], Any]]]:
    """Launcher calls of kernels/sample_posterior.py: every block configuration its launchers can
    pick, and every flag and dtype at the production shape (GPT-2 vocabulary, N = 65536, D = 768)."""
    import torch

    from . import sample_posterior as sp

    out = []

    def logits_call(N: int, K: int, dt: str, final: int, psi: bool, seed_tensor: bool,
                    cut: bool = False) -> Callable[[], Any]:
        def call() -> Any:
            a = meta(N, dtype=torch.float64)
            seed = meta(1, dtype=torch.int64) if seed_tensor else 2**61 + 7
            return sp.sample_posterior_fwd(meta(N, K, dtype=torch_dtype(dt)), meta(N, dtype=torch.int64), a, a,
                                           a if psi else None, seed, final,
                                           cut=meta(N, dtype=torch.float32) if cut else None)
        return call

    def cut_call(N: int, K: int, dt: str) -> Callable[[], Any]:
        return lambda: sp.nucleus_cut_fwd(meta(N, K, dtype=torch_dtype(dt)), 0.9)

    def linear_call(N: int, K: int, D: int, dt: str, final: int, psi: bool, bias: bool,
                    seed_tensor: bool) -> Callable[[], Any]:
        def call() -> Any:
            a = meta(N, dtype=torch.float64)
            seed = meta(1, dtype=torch.int64) if seed_tensor else 2**61 + 7
            return sp.sample_posterior_linear_fwd(meta(N, D, dtype=torch_dtype(dt)), meta(K, D, dtype=torch_dtype(dt)),
                                                  meta(K, dtype=torch_dtype(dt)) if bias else None,
                                                  meta(N, dtype=torch.int64), a, a, a if psi else None, seed, final)
        return call

    for K in sorted({2**i for i in range(1, 17)} | {50257}):
        out.append((f"logits fp32 K={K}", logits_call(1000, K, "fp32", 0, False, False)))
    for dt in ("bf16", "fp16", "fp32"):
        for final in (0, 1, 2):
            for psi in (False, True):
                for seed_tensor in (False, True):
                    out.append((f"logits {dt} K=50257 final={final} psi={int(psi)} seed_ptr={int(seed_tensor)}",
                                logits_call(65536, 50257, dt, final, psi, seed_tensor)))
        for final in (0, 1):
            for psi in (False, True):
                out.append((f"logits {dt} K=50257 nucleus final={final} psi={int(psi)}",
                            logits_call(65536, 50257, dt, final, psi, True, cut=True)))
        out.append((f"nucleus cut {dt} K=50257", cut_call(65536, 50257, dt)))
    for K in (2, 20, 1000, 4096):
        out.append((f"nucleus cut fp32 K={K}", cut_call(100, K, "fp32")))
    for N in (1, 64):
        for K in (2, 20, 40, 70, 128):
            for D in (2, 20, 40, 64):
                out.append((f"linear fp32 N={N} K={K} D={D}", linear_call(N, K, D, "fp32", 0, False, True, False)))
    for dt in ("bf16", "fp16", "fp32"):
        for final in (0, 1, 2):
            for psi in (False, True):
                for bias in (False, True):
                    out.append((f"linear {dt} production final={final} psi={int(psi)} bias={int(bias)}",
                                linear_call(65536, 50257, 768, dt, final, psi, bias, True)))
    return out
