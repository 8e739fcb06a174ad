"""Triton kernels: the curriculum's relaxed input embedding, dense and sparse (docs/math.md section 5).

Per token ``n`` with clean id ``x``: ``w_j = at [j = x] + st eps_j`` (``eps`` standard normal),
``z_t = argmax_j w_j``, ``h0 = sum_j softmax(w / tau)_j E_j = P @ E``. The noise of each
(token, id) is generated once per pass, and the two products are tensor-core GEMMs:

* ``_re_stats_kernel`` (grid: token blocks): the RNG-only pass: ``z_t`` and the normaliser
  ``norm = (max w, log sum exp((w - max w) / tau))`` (kept in w-space: ``w / tau`` rounded at the
  scale ``1/tau`` would cost digits at small ``tau``).
* ``_re_probs_kernel`` (grid: 64 x 64 tiles of tokens x ids): regenerates the noise of its tile
  and writes the weights ``P = softmax(w / tau)`` into a (tokens, ids) buffer padded to multiples
  of 128, in the dot's operand dtype (bf16, or fp16 for fp16 embeddings; fp32 for the explicit
  IEEE product). Sparse mode: a tile whose weights are all below ``delta`` is flagged as empty;
  with ``delta = 1e-6 / K`` the weight a GEMM drops by skipping such tiles is below
  ``K * delta = 1e-6`` per token, so ``|h0 - h0_exact| <= 1e-6 max_j |E_j|``.
* ``kernels.gemm``: ``C (+)= A @ B`` with fp32 accumulation, skipping the (64 x 64)-tile blocks
  the flags mark empty: the forward ``h0 = P @ E`` and the backward ``dE += P^T dh`` (``P`` read
  transposed through its strides; no gradient flows to the noise).

Tokens are processed in chunks whose ``P`` stays within 512 MiB; the backward regenerates ``P``
from the seed and the saved ``norm`` rather than keeping it.

Randomness: Philox keyed by ``seed``; id ``c`` of token ``n`` is draw ``c % 4`` of counter
``(c // 4, n, 2, 0)``: its four words make two Box-Muller pairs (``kernels._common.normal_pair``:
cosine then sine of words 0-1, then of words 2-3). The noise of a (token, id) pair does not
depend on the block sizes, so the three kernels see the same ``eps``. ``HAS_EPS`` replaces the
RNG by an explicit (N, K) tensor (tests). Dots: bf16/fp16 tensor cores with fp32 accumulation
whatever the embedding's dtype (an fp32 embedding is rounded to bf16 once per call); ``ieee`` (an
explicit option) multiplies fp32 exactly. The interpreter runs the same branches with only the
dot emulated. This module never imports duo_fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ._common import cast, interpreting, meta, normal_pair, torch_dtype
from .gemm import FLAG_BLOCK, matmul
from .gemm import blocks as gemm_blocks

__all__ = ["relaxed_stats", "relaxed_fwd", "relaxed_bwd", "probs", "stats_blocks", "fwd_blocks", "bwd_blocks",
           "chunk_tokens", "sparse_delta", "FLAG_BLOCK", "PAD"]

_NOISE_STREAM = 2
_LOG2E = tl.constexpr(1.4426950408889634)
PAD = 128                # the P buffer's rows and columns are padded to multiples of this (>= every GEMM K-step)
_CHUNK_BYTES = 2**29     # P of one chunk of tokens stays within 512 MiB


def sparse_delta(K: int) -> float:
    """Weight below which the sparse mode may drop an entry: the dropped mass per token is < 1e-6."""
    return 1e-6 / K


@triton.jit
def _noise(seed, rows, k0, eps_ptr, stride_en, N, K, HAS_EPS: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """Standard normal eps of the (rows, k0 + [0, BLOCK_K)) tile: one Philox call per four ids,
    two Box-Muller pairs per call; or loaded (tests)."""
    if HAS_EPS:
        cols = k0 + tl.arange(0, BLOCK_K)
        eps = tl.load(eps_ptr + rows.to(tl.int64)[:, None] * stride_en + cols[None, :],
                      mask=(rows < N)[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    else:
        j = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        c0 = j[None, :] + rows[:, None] * 0
        c1 = rows[:, None] + j[None, :] * 0
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c0 * 0 + 2, c0 * 0)
        e0, e1 = normal_pair(r0, r1)
        e2, e3 = normal_pair(r2, r3)
        # element [n, j, p, q] of the double join is draw 2p + q: flattened, column 4j + t gets draw t
        eps = tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), (BLOCK_M, BLOCK_K))
    return eps


@triton.jit
def _latent(eps, cols, x0, at, st, cmask):
    """w = at [col = x] + st eps, -inf outside the vocabulary."""
    w = st[:, None] * eps + tl.where(cols[None, :] == x0[:, None], at[:, None], 0.0)
    return tl.where(cmask[None, :], w, float("-inf"))


@triton.jit(do_not_specialize=["seed"])       # one compile whatever the seed
def _re_stats_kernel(x0_ptr, at_ptr, st_ptr, eps_ptr, stride_en, zt_ptr, norm_ptr, N, K, seed: tl.int64, inv_tau2,
                     HAS_EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per token: running max of w (its argmax is z_t) and the sum of exp((w - max)/tau), in base 2
    (``inv_tau2 = log2(e) / tau``). The max is kept in w-space: (w - m) / tau loses no digits where
    w is close to m."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    x0 = tl.load(x0_ptr + rows, mask=rmask, other=0).to(tl.int32)
    at = tl.load(at_ptr + rows, mask=rmask, other=0.0)
    st = tl.load(st_ptr + rows, mask=rmask, other=1.0)
    m_w = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    best_i = tl.zeros((BLOCK_M,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        eps = _noise(seed, rows, k0, eps_ptr, stride_en, N, K, HAS_EPS, BLOCK_M, BLOCK_K)
        w = _latent(eps, cols, x0, at, st, cols < K)
        blk_w = tl.max(w, 1)
        blk_i = tl.argmax(w, 1).to(tl.int32) + k0
        best_i = tl.where(blk_w > m_w, blk_i, best_i)
        m_new = tl.maximum(m_w, blk_w)
        l_i = l_i * tl.exp2((m_w - m_new) * inv_tau2) + tl.sum(tl.exp2((w - m_new[:, None]) * inv_tau2), 1)
        m_w = m_new
    tl.store(zt_ptr + rows, best_i.to(tl.int64), mask=rmask)
    tl.store(norm_ptr + rows, m_w, mask=rmask)
    tl.store(norm_ptr + N + rows, tl.log(l_i), mask=rmask)


@triton.jit(do_not_specialize=["seed"])       # one compile whatever the seed
def _re_probs_kernel(x0_ptr, at_ptr, st_ptr, eps_ptr, stride_en, norm_ptr, p_ptr, stride_pn, flags_ptr, row0, n_rows,
                     N, K, seed: tl.int64, inv_tau2, delta, HAS_EPS: tl.constexpr, SPARSE: tl.constexpr,
                     EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """P[r, c] = softmax(w / tau) of token ``row0 + r`` at id ``c`` for a (BLOCK_M, BLOCK_K) tile
    of the padded buffer: zeros past ``n_rows`` tokens and past ``K`` ids. ``SPARSE``: the flag
    of a tile with every weight below ``delta`` is 0 (1 otherwise)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < n_rows
    rows = row0 + local
    k0 = pid_k * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    x0 = tl.load(x0_ptr + rows, mask=rmask, other=0).to(tl.int32)
    at = tl.load(at_ptr + rows, mask=rmask, other=0.0)
    st = tl.load(st_ptr + rows, mask=rmask, other=1.0)
    m_w = tl.load(norm_ptr + rows, mask=rmask, other=0.0)
    log_l2 = tl.load(norm_ptr + N + rows, mask=rmask, other=0.0) * _LOG2E
    eps = _noise(seed, rows, k0, eps_ptr, stride_en, N, K, HAS_EPS, BLOCK_M, BLOCK_K)
    w = _latent(eps, cols, x0, at, st, cols < K)
    p = tl.exp2((w - m_w[:, None]) * inv_tau2 - log_l2[:, None])
    p = tl.where(rmask[:, None], p, 0.0)
    if SPARSE:                  # the tile's weights are still written: a GEMM tile spanning a flagged and an
        # unflagged one adds them exactly, not as zeros. The largest weight of a row is that of its largest w.
        p_max = tl.exp2((tl.max(w, 1) - m_w) * inv_tau2 - log_l2)
        keep = tl.max(tl.where(rmask, p_max, 0.0), 0) >= delta
        tl.store(flags_ptr + pid_m * tl.num_programs(1) + pid_k, keep.to(tl.int8))
    tl.store(p_ptr + local.to(tl.int64)[:, None] * stride_pn + cols[None, :], cast(p, p_ptr.dtype.element_ty, EMULATE))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def stats_blocks(K: int, interpret: bool | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of the RNG-only pass."""
    if interpreting() if interpret is None else interpret:
        bk = _pow2(K, 16, 2048)
        return max(1, 65536 // bk), bk
    bk = 512 if K >= 512 else 64
    return 2048 // bk, bk


def fwd_blocks(N: int, K: int, D: int, interpret: bool | None = None, ieee: bool = False) -> tuple[int, int, int]:
    """GEMM tiles of the forward ``h0 = P @ E`` (tokens x features x ids)."""
    return gemm_blocks(D, ieee, interpret)


def bwd_blocks(N: int, K: int, D: int, interpret: bool | None = None, ieee: bool = False) -> tuple[int, int, int]:
    """GEMM tiles of the backward ``dE += P^T dh`` (ids x features x tokens)."""
    return gemm_blocks(D, ieee, interpret)


def chunk_tokens(N: int, K: int, element_bytes: int) -> int:
    """Tokens per chunk: P of a chunk, (tokens, K) padded to multiples of PAD, within 512 MiB."""
    per_token = _round_up(K, PAD) * element_bytes
    return max(PAD, min(_round_up(N, PAD), _CHUNK_BYTES // per_token // PAD * PAD))


def _operand_dtype(dtype: torch.dtype, ieee: bool) -> torch.dtype:
    """The dot's operand dtype: the embedding's when 16-bit, else bf16; fp32 for the IEEE product."""
    if ieee:
        return torch.float32
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


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
                                               eps.stride(0), zt, norm, N, K, seed, 1.4426950408889634 / tau,
                                               HAS_EPS=eps is not None, BLOCK_M=bm, BLOCK_K=bk, num_warps=4)
    return zt, norm


def probs(x0: torch.Tensor, at: torch.Tensor, st: torch.Tensor, norm: torch.Tensor, K: int, tau: float, seed: int,
          sparse: bool, row0: int, n_rows: int, out: torch.Tensor, flags: torch.Tensor,
          eps: torch.Tensor | None = None) -> None:
    """Fill ``out`` (>= n_rows rows padded to PAD, K padded to PAD columns) with the weights of
    tokens ``row0 .. row0 + n_rows`` (zeros elsewhere) and, when sparse, ``flags``
    (rows / FLAG_BLOCK, columns / FLAG_BLOCK) int8 with the non-empty tiles."""
    N = x0.shape[0]
    grid = (out.shape[0] // FLAG_BLOCK, out.shape[1] // FLAG_BLOCK)
    _re_probs_kernel[grid](x0, at, st, eps if eps is not None else at, 0 if eps is None else eps.stride(0), norm, out,
                           out.stride(0), flags, row0, n_rows, N, K, seed, 1.4426950408889634 / tau, sparse_delta(K),
                           HAS_EPS=eps is not None, SPARSE=sparse, EMULATE=interpreting(), BLOCK_M=FLAG_BLOCK,
                           BLOCK_K=FLAG_BLOCK, num_warps=4)


def _buffers(N: int, K: int, dtype: torch.dtype, device: torch.device,
             chunk: int | None) -> tuple[int, torch.Tensor, torch.Tensor]:
    chunk = chunk or chunk_tokens(N, K, torch.finfo(dtype).bits // 8)
    rows = min(_round_up(N, PAD), _round_up(chunk, PAD))
    cols = _round_up(K, PAD)
    return chunk, torch.empty((rows, cols), dtype=dtype, device=device), \
        torch.empty((rows // FLAG_BLOCK, cols // FLAG_BLOCK), dtype=torch.int8, device=device)


def relaxed_fwd(x0: torch.Tensor, at: torch.Tensor, st: torch.Tensor, embedding: torch.Tensor, tau: float, seed: int,
                sparse: bool, eps: torch.Tensor | None = None,
                blocks: tuple[tuple[int, int, int], tuple[int, int]] | None = None, ieee: bool = False,
                chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, at, st (N,); embedding (K, D) fp32/bf16/fp16 with unit stride along D; ``blocks``
    overrides ((GEMM BLOCK_M, BLOCK_N, BLOCK_K), (stats BLOCK_M, BLOCK_K)); ``ieee``: fp32 weights
    and an exact fp32 product (fp32 embeddings only); ``chunk``: tokens per chunk.
    Returns (h0 (N, D) in the embedding's dtype, zt (N,) int64, norm (2, N) float32)."""
    K, D = embedding.shape
    N = _check(x0, at, st, eps, K)
    if embedding.stride(1) != 1:
        raise ValueError("embedding needs unit stride along D")
    if ieee and embedding.dtype != torch.float32:
        raise ValueError(f"the IEEE fp32 product needs an fp32 embedding, got {embedding.dtype}")
    zt, norm = relaxed_stats(x0, at, st, K, tau, seed, eps, None if blocks is None else blocks[1])
    h0 = torch.empty((N, D), dtype=embedding.dtype, device=x0.device)
    if N == 0:
        return h0, zt, norm
    op_dtype = _operand_dtype(embedding.dtype, ieee)
    chunk, buf, flags = _buffers(N, K, op_dtype, x0.device, chunk)
    emb = embedding.to(op_dtype)            # fp32 -> bf16 once (K x D), as each tile would round it
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        probs(x0, at, st, norm, K, tau, seed, sparse, r0, n, buf, flags, eps)
        matmul(buf, emb, h0[r0:r0 + n], False, ieee, flags if sparse else None, None if blocks is None else blocks[0])
    return h0, zt, norm


def relaxed_bwd(x0: torch.Tensor, at: torch.Tensor, st: torch.Tensor, norm: torch.Tensor, dh: torch.Tensor, K: int,
                tau: float, seed: int, sparse: bool, eps: torch.Tensor | None = None,
                blocks: tuple[int, int, int] | None = None, ieee: bool = False,
                chunk: int | None = None) -> torch.Tensor:
    """d embedding (K, D) float32 = softmax(w / tau)^T dh, the weights regenerated from ``seed``
    and ``norm`` chunk by chunk and accumulated in fp32."""
    N = _check(x0, at, st, eps, K)
    D = dh.shape[1]
    if dh.shape != (N, D) or dh.stride(1) != 1:
        raise ValueError(f"dh must be ({N}, D) with unit stride along D")
    if ieee and dh.dtype != torch.float32:
        raise ValueError(f"the IEEE fp32 product needs an fp32 gradient, got {dh.dtype}")
    de = torch.zeros((K, D), dtype=torch.float32, device=dh.device)
    if N == 0:
        return de
    op_dtype = _operand_dtype(dh.dtype, ieee)
    chunk, buf, flags = _buffers(N, K, op_dtype, dh.device, chunk)
    dh_op = dh.to(op_dtype)                 # fp32 -> bf16 once (N x D)
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        probs(x0, at, st, norm, K, tau, seed, sparse, r0, n, buf, flags, eps)
        rows = _round_up(n, PAD)
        # a = P^T: (ids, tokens) through the strides; the flags are read transposed the same way
        matmul(buf[:rows].t(), dh_op[r0:r0 + n], de, True, ieee, flags[:rows // FLAG_BLOCK].t() if sparse else None,
               blocks)
    return de


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for duo_fast.tools.compile_check (meta tensors: nothing runs)
# ---------------------------------------------------------------------------------------------

def compile_calls() -> list[tuple[str, Callable[[], Any]]]:
    """Every block configuration of kernels/relaxed_embedding.py's launchers; every flag and dtype
    at the production shape (N = 16384 tokens, GPT-2 vocabulary, D = 768)."""
    import torch

    from . import relaxed_embedding as re_k

    out = []

    def call(N: int, K: int, D: int, dt: str, sparse: bool, has_eps: bool, backward: bool,
             ieee: bool = False) -> Callable[[], Any]:
        def run() -> Any:
            x0, at = meta(N, dtype=torch.int64), meta(N, dtype=torch.float32)
            eps = meta(N, K, dtype=torch.float32) if has_eps else None
            if backward:
                return re_k.relaxed_bwd(x0, at, at, meta(2, N, dtype=torch.float32), meta(N, D, dtype=torch_dtype(dt)), K,
                                        1e-3, 2**61 + 7, sparse, eps, ieee=ieee)
            return re_k.relaxed_fwd(x0, at, at, meta(K, D, dtype=torch_dtype(dt)), 1e-3, 2**61 + 7, sparse, eps, ieee=ieee)
        return run

    for N in (1, 100, 32768):
        for K in (20, 100, 600, 50257):
            for D in (20, 70, 768):
                for backward in (False, True):
                    for ieee in (False, True):
                        out.append((f"{'bwd' if backward else 'fwd'} fp32{' ieee' if ieee else ''} N={N} K={K} D={D}",
                                    call(N, K, D, "fp32", True, False, backward, ieee)))
    for dt in ("fp32", "bf16", "fp16"):
        for sparse in (False, True):
            for has_eps in (False, True):
                for backward in (False, True):
                    for ieee in (False, True) if dt == "fp32" else (False,):
                        out.append((f"{'bwd' if backward else 'fwd'} {dt}{' ieee' if ieee else ''} production "
                                    f"sparse={int(sparse)} eps={int(has_eps)}",
                                    call(16384, 50257, 768, dt, sparse, has_eps, backward, ieee)))
    return out
