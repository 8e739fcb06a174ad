"""Triton kernel: a GEMM with fp32 accumulation that can add into an fp32 output and skip
flagged blocks: ``C (+)= A @ B``.

Used where cuBLAS would need a dtype it lacks or a pass it cannot skip: the curriculum's
``h0 = P @ E`` and ``dE += P^T dh`` (kernels/relaxed_embedding.py, with the sparse mode's empty
tiles skipped) and the RB loss's ``dW += dlogits^T h`` summed over token chunks straight into an
fp32 buffer (a bf16 cuBLAS product would round each chunk's dW to bf16 and need an extra fp32
pass to add it). ``A`` may be a transposed view (its strides are used as they are); rows of
``A`` past ``a_rows`` and columns of ``B`` past ``N_out`` are masked (vector loads survive: the
masks are constant over aligned groups when the sizes are multiples of 16), rows of ``B`` past
``b_rows`` are clamped to the last (``A`` is zero there), and K is masked only when it is not a
multiple of BLOCK_K. Operands bf16/fp16 (tensor cores) or fp32
with ``IEEE`` (exact fp32 products on the FMA units). The interpreter runs the same branches with
only the dot emulated (``_common.mma``). This module never imports duo_fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ._common import cast, interpreting, meta, mma, torch_dtype

__all__ = ["matmul", "blocks", "FLAG_BLOCK"]

FLAG_BLOCK = 64          # the skip flags cover FLAG_BLOCK x FLAG_BLOCK blocks of A


@triton.jit
def _mm_kernel(a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, c_ptr, stride_cm, stride_cn,
               flags_ptr, stride_fm, stride_fk, flags_m, flags_k, M, N_out, K_steps, a_rows, b_rows,
               ACCUMULATE: tl.constexpr, SKIP: tl.constexpr, IEEE: tl.constexpr, EMULATE: tl.constexpr,
               EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               FB: tl.constexpr):
    """c[:M, :N_out] (+)= a[:, :K_steps] @ b[:K_steps]. ``SKIP``: a K-step whose (FB x FB) flags
    over this tile's rows are all 0 is skipped (A is zero there, or below the caller's bound)."""
    pid_n = tl.program_id(0)          # the column tiles of one row block run side by side: its rows of a
    pid_m = tl.program_id(1)          # (the large operand) come from HBM once and from L2 after
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # masks, not clamped indices, along the contiguous dimensions: a clamp hides the contiguity
    # from Triton's axis analysis and turns each vector load into 2-byte loads (cost model: 743
    # instead of ~500 instructions per step); a mask constant over 16 elements does not
    a_tile = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    a_ok = (rm < a_rows)[:, None]
    b_cols = b_ptr + rn[None, :] * stride_bn
    b_ok = (rn < N_out)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    FM: tl.constexpr = BLOCK_M // FB if BLOCK_M >= FB else 1
    FK: tl.constexpr = BLOCK_K // FB if BLOCK_K >= FB else 1
    fm = (pid_m * BLOCK_M) // FB + tl.arange(0, FM)
    for k0 in range(0, K_steps, BLOCK_K):
        kk = k0 + rk
        run = True
        if SKIP:
            fk = k0 // FB + tl.arange(0, FK)
            f = tl.load(flags_ptr + fm[:, None] * stride_fm + fk[None, :] * stride_fk,
                        mask=(fm < flags_m)[:, None] & (fk < flags_k)[None, :], other=0)
            run = tl.max(tl.max(f.to(tl.int32), 1), 0) > 0
        if run:
            if EVEN_K:
                a = tl.load(a_tile + kk.to(tl.int64)[None, :] * stride_ak, mask=a_ok, other=0.0)
            else:
                a = tl.load(a_tile + kk.to(tl.int64)[None, :] * stride_ak, mask=a_ok & (kk < K_steps)[None, :],
                            other=0.0)
            b = tl.load(b_cols + tl.minimum(kk, b_rows - 1).to(tl.int64)[:, None] * stride_bk, mask=b_ok, other=0.0)
            acc = mma(a, b, acc, IEEE, EMULATE)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    cmask = (rm < M)[:, None] & (rn < N_out)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=cmask, other=0.0)
    tl.store(c_ptrs, cast(acc, c_ptr.dtype.element_ty, EMULATE), mask=cmask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def blocks(N_out: int, ieee: bool, interpret: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for N_out output columns: 128 x 128 x 128 tensor-core tiles
    (8 warps; 64-deep steps cost 1.7x the issue slots by the cost model), 64 x 64 x 32 for the
    IEEE fp32 product on the FMA units (4 warps, no spills); large tiles in the interpreter,
    which runs programs one by one in Python."""
    if interpreting() if interpret is None else interpret:
        return 128, _pow2(N_out, 16, 256), 128
    if ieee:
        return 64, (64 if N_out >= 64 else 16), 32
    return 128, (128 if N_out >= 128 else 64 if N_out >= 64 else 16), 128


def _warps(bm: int, ieee: bool) -> int:
    """8 warps (two warpgroups) for the 128-row tensor-core tiles, 4 for the IEEE product's."""
    return 4 if ieee or bm < 128 else 8


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, ieee: bool = False,
           flags: torch.Tensor | None = None, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``c (+)= a @ b`` for a (a_rows, K), b (b_rows, N_out) with b_rows >= 1 (rows of ``b`` past
    its end are read as its last: ``a`` must be zero in those columns), c (M, N_out) with
    M <= a_rows: fp32 accumulation, stored in ``c``'s dtype (``accumulate``: added to c, which
    should then be fp32). ``a`` and ``b`` share a dtype: bf16/fp16, or fp32 with ``ieee``.
    ``flags`` (int8, a_rows / FLAG_BLOCK x K / FLAG_BLOCK, any strides): the K-steps whose flags
    over a tile's rows are all 0 are skipped. Returns ``c``."""
    if a.dtype != b.dtype or (a.dtype == torch.float32) != ieee:
        raise ValueError(f"a and b must share a 16-bit dtype, or be fp32 with ieee=True: {a.dtype}, {b.dtype}")
    M, N_out = c.shape
    a_rows, K = a.shape
    if M == 0 or N_out == 0:
        return c
    bm, bn, bk = tiles or blocks(N_out, ieee)
    grid = (triton.cdiv(N_out, bn), triton.cdiv(M, bm))
    f = flags if flags is not None else c
    _mm_kernel[grid](a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), c, c.stride(0), c.stride(1),
                     f, *(flags.stride() if flags is not None else (0, 0)),
                     *(flags.shape if flags is not None else (0, 0)), M, N_out, K, a_rows, b.shape[0],
                     ACCUMULATE=accumulate, SKIP=flags is not None, IEEE=ieee, EMULATE=interpreting(),
                     EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FB=FLAG_BLOCK, num_warps=_warps(bm, ieee))
    return c


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for duo_fast.tools.compile_check (meta tensors: nothing runs)
# ---------------------------------------------------------------------------------------------

def compile_calls() -> list[tuple[str, Callable[[], Any]]]:
    """kernels/gemm.py on its own: every operand dtype, with and without accumulation, skip flags
    and a ragged K, at its users' production shapes and small ones."""
    import torch

    from . import gemm

    out = []

    def call(M: int, N_out: int, K: int, dt: str, accumulate: bool, flags: bool, transposed: bool) -> Callable[[], Any]:
        def run() -> Any:
            a = meta(K, M, dtype=torch_dtype(dt)).t() if transposed else meta(M, K, dtype=torch_dtype(dt))
            c = meta(M, N_out, dtype=torch.float32 if accumulate else torch_dtype(dt))
            f = meta(-(-M // gemm.FLAG_BLOCK), -(-K // gemm.FLAG_BLOCK), dtype=torch.int8) if flags else None
            return gemm.matmul(a, meta(K, N_out, dtype=torch_dtype(dt)), c, accumulate, ieee=dt == "fp32", flags=f)
        return run

    for dt in ("bf16", "fp16", "fp32"):
        for M, N_out, K in ((16384, 768, 50304), (50304, 768, 2560), (100, 70, 300), (37, 20, 50)):
            for accumulate in (False, True):
                for flags in (False, True):
                    out.append((f"mm {dt} M={M} N={N_out} K={K} acc={int(accumulate)} skip={int(flags)}",
                                call(M, N_out, K, dt, accumulate, flags, accumulate)))
    return out
