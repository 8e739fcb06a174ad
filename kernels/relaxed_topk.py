"""Triton kernel: the adaptive exact top-k relaxation of the curriculum (docs/math.md section 5).

``_adaptive_topk_kernel`` (grid: token blocks) draws, per token, ``w_x = at + st eps_x`` and the
order statistics ``G_1 > G_2 > ...`` of the other ``K - 1`` standard normals one at a time,
``Phi(G_j) = Phi(G_{j-1}) U_j^(1/(K-j))`` in log space (``-log U_j`` an exact-tail exponential),
until ``bound_k = (K - 1 - k) exp((st G_k - w_max) / tau) <= tol`` (every coordinate not drawn
is below ``st G_k``) or ``k = KMAX``. The id of each order statistic is a uniform draw among the
ids other than ``x`` (Lemire's multiply-shift with rejection: exactly uniform) redrawn while it
repeats an earlier id, so the ids are distinct, uniformly random and in random order. Writes,
per token, ``1 + KMAX`` columns (``x`` first) of ids, latents ``w`` (-inf where unused) and
softmax weights over the kept rows, and ``z_t`` (the exact argmax), ``k`` and the bound.

Randomness: Philox keyed by ``seed`` with counters ``(token, j, 3, attempt)``: for each ``j`` the
first call's word 0 gives ``-log U_j``, its words 1-3 and every further call's four words are id
candidates (all four outputs used); ``eps_x`` comes from ``(token, 0, 3, 0)``. ``Phi^-1`` is
AS241 (PPND7, float32, relative error ~1e-7), written out here: the same code on GPU and in the
interpreter. O(k) work per token; no K-wide noise. This module never imports duo_fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ._common import exponential32, meta, normal32

__all__ = ["adaptive_topk", "block_tokens", "kmax_constexpr"]

_STREAM = 3


@triton.jit
def _ppnd7(q):
    """Phi^-1(q) for q in (0, 1), AS241 PPND7 (float32 accuracy)."""
    d = q - 0.5
    r = 0.180625 - d * d
    central = d * (((59.109374720 * r + 159.29113202) * r + 50.434271938) * r + 3.3871327179) / (
        ((67.187563600 * r + 78.757757664) * r + 17.895169469) * r + 1.0)
    t = tl.sqrt(-tl.log(tl.minimum(q, 1.0 - q)))
    t1 = t - 1.6
    mid = (((0.17023821103 * t1 + 1.3067284816) * t1 + 2.7568153900) * t1 + 1.4234372777) / (
        (0.12021132975 * t1 + 0.73700164250) * t1 + 1.0)
    t2 = t - 5.0
    far = (((0.017337203997 * t2 + 0.42868294337) * t2 + 3.0812263860) * t2 + 6.6579051150) / (
        (0.012258202635 * t2 + 0.24197894225) * t2 + 1.0)
    tail = tl.where(t <= 5.0, mid, far)
    tail = tl.where(d < 0, -tail, tail)
    return tl.where(tl.abs(d) <= 0.425, central, tail)


@triton.jit
def _neg_expm1(x):
    """-expm1(x) for x <= 0, accurate near 0 (a series below |x| = 1e-3)."""
    series = -x * (1.0 + x * (0.5 + x * (0.16666666666666666 + x * 0.041666666666666664)))
    return tl.where(x > -1e-3, series, 1.0 - tl.exp(x))


@triton.jit
def _candidate(r, t, ok, x, ids, cols, j, m, lemire_t):
    """Fold one uint32 word into the id draw of column j: accept ``hi(r m)`` (Lemire: reject
    ``lo(r m) < 2^32 mod m``), mapped past ``x``, unless an earlier column holds it."""
    prod = r.to(tl.uint64) * m
    cand = (prod >> 32).to(tl.int32)
    valid = (prod & 0xFFFFFFFF) >= lemire_t
    cid = cand + (cand >= x).to(tl.int32)
    seen = tl.sum(((ids == cid[:, None]) & (cols[None, :] < j)).to(tl.int32), 1) > 0
    good = valid & (seen == 0) & (ok == 0)
    return tl.where(good, cid, t), ok | good


@triton.jit(do_not_specialize=["seed"])       # one compile whatever the seed
def _adaptive_topk_kernel(x_ptr, at_ptr, st_ptr, ids_ptr, w_ptr, wt_ptr, zt_ptr, k_ptr, bound_ptr,
                          N, K, k_cap, seed: tl.int64, inv_tau, log_tol, lemire_t,
                          BLOCK: tl.constexpr, KMAX: tl.constexpr, STREAM: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    cols = tl.arange(0, KMAX)
    x = tl.load(x_ptr + rows, mask=rmask, other=0).to(tl.int32)
    at = tl.load(at_ptr + rows, mask=rmask, other=1.0)
    st = tl.load(st_ptr + rows, mask=rmask, other=1.0)
    zero = rows * 0
    r0, r1, _, _ = tl.philox(seed, rows, zero, zero + STREAM, zero)
    w_x = at + st * normal32(r0, r1)
    w_max = w_x
    w1 = w_x
    id1 = x
    log_phi = tl.zeros([BLOCK], tl.float32)
    wtile = tl.full([BLOCK, KMAX], float("-inf"), tl.float32)
    ids = tl.full([BLOCK, KMAX], -1, tl.int32)
    done = (rows >= N).to(tl.int32)
    k = tl.full([BLOCK], KMAX, tl.int32)
    bound = tl.zeros([BLOCK], tl.float32)
    m = K - 1
    remaining = tl.sum(1 - done, 0)
    j = 0
    while (j < k_cap) & (remaining > 0):
        s0, s1, s2, s3 = tl.philox(seed, rows, zero + j + 1, zero + STREAM, zero)
        log_phi = log_phi - exponential32(s0) / (K - 1 - j).to(tl.float32)
        w_j = st * -_ppnd7(_neg_expm1(log_phi))
        t = x
        ok = done
        t, ok = _candidate(s1, t, ok, x, ids, cols, j, m, lemire_t)
        t, ok = _candidate(s2, t, ok, x, ids, cols, j, m, lemire_t)
        t, ok = _candidate(s3, t, ok, x, ids, cols, j, m, lemire_t)
        attempt = 1
        while tl.sum(1 - ok, 0) > 0:            # rare: a repeated id or a Lemire rejection
            q0, q1, q2, q3 = tl.philox(seed, rows, zero + j + 1, zero + STREAM, zero + attempt)
            t, ok = _candidate(q0, t, ok, x, ids, cols, j, m, lemire_t)
            t, ok = _candidate(q1, t, ok, x, ids, cols, j, m, lemire_t)
            t, ok = _candidate(q2, t, ok, x, ids, cols, j, m, lemire_t)
            t, ok = _candidate(q3, t, ok, x, ids, cols, j, m, lemire_t)
            attempt += 1
        live = done == 0
        put = (cols[None, :] == j) & live[:, None]
        wtile = tl.where(put, w_j[:, None], wtile)
        ids = tl.where(put, t[:, None], ids)
        first = j == 0
        w1 = tl.where(first, w_j, w1)
        id1 = tl.where(first, t, id1)
        w_max = tl.where(first, tl.maximum(w_x, w_j), w_max)
        log_b = tl.log((K - 2 - j).to(tl.float32)) + (w_j - w_max) * inv_tau
        newly = live & ((log_b <= log_tol) | (j == k_cap - 1))
        k = tl.where(newly, j + 1, k)
        bound = tl.where(newly, tl.exp(log_b), bound)
        done = tl.where(newly, 1, done)
        remaining = tl.sum(1 - done, 0)
        j += 1
    top = tl.maximum(w_x, tl.max(wtile, 1))
    e0 = tl.exp((w_x - top) * inv_tau)
    et = tl.exp((wtile - top[:, None]) * inv_tau)
    norm = e0 + tl.sum(et, 1)
    used = wtile > float("-inf")
    out = rows.to(tl.int64)[:, None] * (KMAX + 1) + 1 + cols[None, :]
    omask = rmask[:, None]
    tl.store(ids_ptr + rows.to(tl.int64) * (KMAX + 1), x.to(tl.int64), mask=rmask)
    tl.store(w_ptr + rows.to(tl.int64) * (KMAX + 1), w_x, mask=rmask)
    tl.store(wt_ptr + rows.to(tl.int64) * (KMAX + 1), e0 / norm, mask=rmask)
    tl.store(ids_ptr + out, tl.where(used, ids, x[:, None]).to(tl.int64), mask=omask)
    tl.store(w_ptr + out, wtile, mask=omask)
    tl.store(wt_ptr + out, et / norm[:, None], mask=omask)
    tl.store(zt_ptr + rows, tl.where(w_x > w1, x, id1).to(tl.int64), mask=rmask)
    tl.store(k_ptr + rows, k.to(tl.int64), mask=rmask)
    tl.store(bound_ptr + rows, bound, mask=rmask)


def kmax_constexpr(k_max: int) -> int:
    """The kernel's column count: ``k_max`` rounded up to a power of two (>= 2)."""
    return max(2, triton.next_power_of_2(k_max))


def block_tokens(kc: int) -> int:
    """Tokens per program: (tokens x columns) tiles of at most 512 entries (4 per thread), so the
    two tiles and the id-collision test stay in registers."""
    return max(8, min(32, 512 // kc))


def adaptive_topk(x0: torch.Tensor, at: torch.Tensor, st: torch.Tensor, K: int, tau: float, tol: float, k_max: int,
                  seed: int) -> dict[str, torch.Tensor]:
    """x0 (N,) int64, at/st (N,) float32, ``1 <= k_max <= K - 1``. Returns the dict of
    ``duo_fast.reference.adaptive_topk_relaxation_ref`` (float32 weights, latents and bound)
    with ``1 + kmax_constexpr(k_max)`` columns (those past ``k_max`` unused)."""
    N = x0.shape[0]
    kc = kmax_constexpr(k_max)
    dev = x0.device
    ids = torch.empty((N, kc + 1), dtype=torch.int64, device=dev)
    w = torch.empty((N, kc + 1), dtype=torch.float32, device=dev)
    wt = torch.empty((N, kc + 1), dtype=torch.float32, device=dev)
    zt = torch.empty(N, dtype=torch.int64, device=dev)
    k = torch.empty(N, dtype=torch.int64, device=dev)
    bound = torch.empty(N, dtype=torch.float32, device=dev)
    if N:
        block = block_tokens(kc)
        grid = (triton.cdiv(N, block),)
        _adaptive_topk_kernel[grid](x0, at, st, ids, w, wt, zt, k, bound, N, K, k_max, seed, 1.0 / tau,
                                    math.log(tol), (2**32) % (K - 1), BLOCK=block, KMAX=kc, STREAM=_STREAM)
    return {"ids": ids, "weights": wt, "w": w, "zt": zt, "k": k, "bound": bound}


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for duo_fast.tools.compile_check (meta tensors: nothing runs)
# ---------------------------------------------------------------------------------------------

def compile_calls() -> list[tuple[str, Callable[[], Any]]]:
    """Every column count of kernels/relaxed_topk.py's launcher (k_max rounded up to a power of
    two), at small and production shapes."""
    import torch

    from . import relaxed_topk as rt

    def call(N: int, K: int, k_max: int) -> Callable[[], Any]:
        def run() -> Any:
            x0, at = meta(N, dtype=torch.int64), meta(N, dtype=torch.float32)
            return rt.adaptive_topk(x0, at, at, K, 1e-3, 1e-6, k_max, 2**61 + 7)
        return run

    return [(f"adaptive N={N} K={K} k_max={k}", call(N, K, k)) for N in (1, 100, 16384) for K in (20, 100, 50257)
            for k in (1, 2, 8, 19, 32, 64)]
