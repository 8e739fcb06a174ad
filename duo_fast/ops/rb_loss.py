"""The Rao-Blackwellized NELBO (docs/math.md section 3) from logits, or fused with the output
projection so that the logits never exist whole.

Both operators reduce each token's row of logits to nine float32 statistics (log-sum-exp, the
logits at ``z_t`` and ``x``, and the vocabulary sums listed in ``duo_fast.kernels.rb_loss``),
evaluate the loss from them in float64, and in the backward emit ``d logits`` elementwise from
the same statistics and float64 per-token coefficients. Near ``a = 0`` the loss lives in the
second-order part of ``S_log``, so it is summed as ``log1p(beta p) - beta p`` (``beta = K a/(1 - a)``)
and the first-order part ``beta`` is added back exactly; above ``beta = 1`` the plain
``sum log1p(beta p)`` is used. The gradient's ``r_m - Q`` and ``1 - p_i`` are taken from
separately accumulated sums, so neither cancels in float32.

Implementations: Triton kernels (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``) and
a PyTorch path for CPU tensors that works on ``chunk_tokens`` rows at a time; on CPU its per-chunk
statistics and gradient run as one fused C++ op each (``csrc/rb_loss_cpu.cpp``: the same float32
arithmetic in 3 + 1 passes per row instead of ~20) when the extension is built and the CPU has
AVX2/FMA, else as the PyTorch functions below. ``rb_loss_linear``
computes ``logits = h @ weight.T + bias`` one chunk of tokens at a time (a cuBLAS matmul on GPU,
bf16 in with fp32 accumulation) in the forward and again in the backward, so its extra memory
is one ``chunk_tokens x K`` block instead of ``N x K``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from duo_fast.ops import backends
from duo_fast.ops.backends import token_rows

__all__ = ["rb_loss", "rb_loss_linear", "log1p_minus_x", "default_chunk_tokens", "stats_torch", "grad_torch",
           "grad_coefficients"]

NUM_STATS = 9


def log1p_minus_x(x: Tensor) -> Tensor:
    """``log1p(x) - x`` for ``x >= 0`` without cancellation (relative error ~1e-7 in fp32)."""
    small = x < 0.1
    xs = torch.where(small, x, torch.zeros_like(x))
    # -x^2/2 + x^3/3 - ... - x^8/8; the first omitted term is below 2.3e-8 relative at x = 0.1.
    series = xs * xs * (-1 / 2 + xs * (1 / 3 + xs * (-1 / 4 + xs * (1 / 5 + xs * (-1 / 6 + xs * (1 / 7 - xs / 8))))))
    return torch.where(small, series, torch.log1p(x) - x)


def default_chunk_tokens(K: int, device: torch.device, elem_bytes: int = 4) -> int:
    """Rows per chunk: a ``chunk x K`` block of about 256 MiB on GPU, in multiples of 128 rows (the
    dW GEMM's step along tokens: no masked step but the last chunk's); 8 MiB on CPU, multiples of
    16 (at least 16 rows)."""
    if device.type == "cuda":
        return max(128, (256 << 20) // max(1, K * elem_bytes) // 128 * 128)
    return max(16, (8 << 20) // max(1, K * elem_bytes) // 16 * 16)


# ---------------------------------------------------------------------------------------------
# Per-chunk statistics and gradients, PyTorch (the Triton kernels compute the same quantities)
# ---------------------------------------------------------------------------------------------

def stats_torch(logits: Tensor, zt: Tensor, x0: Tensor, beta: Tensor) -> Tensor:
    """(n, K) logits -> (9, n) float32 ``[lse, l_i, l_x, rem, s1d, Q, bT2, cpi, cpx]``.
    ``rem`` is only used where ``beta <= 1`` (rare in training: ``a < 1/(K + 1)``), so it is only
    computed on those rows, in float64 (per element ``log1p(x) - x`` then loses ~1e-16 x; the
    kernels use a float32 series instead); elsewhere it is 0."""
    lf = logits.float()
    lse = torch.logsumexp(lf, -1)
    l_i = lf.gather(-1, zt[:, None])[:, 0]
    l_x = lf.gather(-1, x0[:, None])[:, 0]
    p = torch.exp(lf - lse[:, None])
    x = beta[:, None] * p
    s1d = torch.log1p(x).sum(-1)
    rem = torch.zeros_like(s1d)
    small = (beta <= 1).nonzero()[:, 0]
    if small.numel():
        x64 = x.index_select(0, small).double()
        rem[small] = (torch.log1p(x64) - x64).sum(-1).float()
        del x64
    pr = p / (1 + x)                                           # p_j r_j
    q = pr.sum(-1)
    bt2 = torch.einsum("nk,nk->n", x, pr)
    del x, pr
    cp = []
    for ids in (zt, x0):                                       # sum over j != id, without 1 - p_id
        saved = p.gather(-1, ids[:, None])
        p.scatter_(-1, ids[:, None], 0.0)
        cp.append(p.sum(-1))
        p.scatter_(-1, ids[:, None], saved)
    return torch.stack([lse, l_i, l_x, rem, s1d, q, bt2, cp[0], cp[1]])


def grad_torch(logits: Tensor, zt: Tensor, x0: Tensor, beta: Tensor, stats: Tensor, coefs: Tensor) -> Tensor:
    """(n, K) logits -> d loss/d logits (n, K) in the logits' dtype (see kernels/rb_loss.py)."""
    lse, q, bt2 = stats[0, :, None], stats[5, :, None], stats[6, :, None]
    cd, ce, cx, ce_c, cx_c = (c[:, None] for c in coefs)
    p = (logits.float() - lse).exp_()
    x = p * beta[:, None]
    r = (x + 1).reciprocal_()
    big = r >= 0.5
    d = torch.where(big, x.mul_(r).neg_().add_(bt2), r.sub_(q))          # r - Q without cancellation
    del x, r, big
    g = d * cd
    g.sub_(ce + cx).mul_(p)                                             # cd p D - p (ce + cx)
    p_i, d_i = p.gather(-1, zt[:, None]), d.gather(-1, zt[:, None])
    g.scatter_(-1, zt[:, None], cd * p_i * d_i + ce_c - p_i * cx)
    p_x, d_x = p.gather(-1, x0[:, None]), d.gather(-1, x0[:, None])
    ne = (zt != x0)[:, None]
    g.scatter_(-1, x0[:, None], torch.where(ne, cd * p_x * d_x + cx_c - p_x * ce, g.gather(-1, x0[:, None])))
    return g.to(logits.dtype)


def _stats(logits: Tensor, zt: Tensor, x0: Tensor, beta: Tensor, impl: str) -> Tensor:
    """Per-row statistics of one chunk by ``impl`` (``triton``, ``cpp`` or ``torch``: ``backends.choose``)."""
    if impl == "triton":
        from duo_fast.kernels.rb_loss import rb_stats

        return rb_stats(logits, zt, x0, beta)
    if impl == "cpp":
        lf = logits.float()
        return torch.ops.duo_fast.rb_stats_cpu(lf if lf.stride(1) == 1 else lf.contiguous(), zt, x0, beta)
    return stats_torch(logits, zt, x0, beta)


def _grad(logits: Tensor, zt: Tensor, x0: Tensor, beta: Tensor, stats: Tensor, coefs: Tensor, impl: str,
          inplace: bool = False, out: Tensor | None = None) -> Tensor:
    """d loss / d logits of one chunk; the C++ path writes into ``out`` (a float32 view of the
    caller's gradient) when given, and into the logits themselves when ``inplace``."""
    if impl == "triton":
        from duo_fast.kernels.rb_loss import rb_grad

        return rb_grad(logits, zt, x0, beta, stats.contiguous(), coefs.contiguous(), out=logits if inplace else None)
    if impl == "cpp":
        lf = logits.float()
        lf = lf if lf.stride(1) == 1 else lf.contiguous()
        own = inplace or lf.data_ptr() != logits.data_ptr()          # a buffer nobody else reads: write into it
        if out is None or out.dtype != torch.float32 or out.stride(1) != 1:
            out = lf if own else torch.empty_like(lf)
        res = torch.ops.duo_fast.rb_grad_cpu(lf, zt, x0, beta, stats, coefs, out)
        return res.to(logits.dtype)
    return grad_torch(logits, zt, x0, beta, stats, coefs)


# ---------------------------------------------------------------------------------------------
# Per-token float64 scalars: the loss and the gradient coefficients
# ---------------------------------------------------------------------------------------------

def _loss_from_stats(stats: Tensor, eq: Tensor, a: Tensor, da: Tensor, K: int) -> Tensor:
    """Per-token loss (N,) float64 from the (9, N) statistics; a, da (N,) float64."""
    lse, l_i, l_x, rem, s1d = (s.double() for s in stats[:5])
    beta = K * a / (1 - a)
    s1 = torch.where(beta <= 1, beta + rem, s1d)                 # sum_j log1p(beta p_j)
    l1p_i = torch.log1p(beta * torch.exp(l_i - lse))            # log xbar_th_i - log(1 - a)
    l1p_x = torch.log1p(beta * torch.exp(l_x - lse))
    eq = eq.double()
    ne = 1 - eq
    term1 = K * (1 / ((1 - a) + K * a * eq) - 1 / ((1 - a) * torch.exp(l1p_i)))
    log_c = torch.log1p(-a) - torch.log(K * a + 1 - a)
    c = torch.exp(log_c)
    c2 = torch.where(eq > 0, c, torch.ones_like(c))
    offset = ((K - 1) * c * eq - ne / c) * log_c
    term2 = -c2 * (s1 - K * l1p_i) - ne * beta * (l1p_x - l1p_i) + offset
    return da / (K * a) * (term1 - term2)


def grad_coefficients(stats: Tensor, eq: Tensor, a: Tensor, da: Tensor, K: int, g: Tensor) -> Tensor:
    """(5, N) float32 ``[cd, ce, cx, ce (1 - p_i), cx (1 - p_x)]`` of the elementwise gradient
    ``cd p_m (r_m - Q) - p_m (ce + cx) + [m = z_t] ce + [m = x != z_t] cx`` (section 3's
    gradient regrouped; ``g`` (N,) is the upstream gradient)."""
    lse, l_i, l_x = (s.double() for s in stats[:3])
    cpi, cpx = stats[7].double(), stats[8].double()
    p_i, p_x = torch.exp(l_i - lse), torch.exp(l_x - lse)
    beta = K * a / (1 - a)
    bpi, bpx = beta * p_i, beta * p_x
    g0 = g * da / (K * a)
    c2 = torch.where(eq, 1 / (1 + beta), torch.ones_like(beta))
    # z_t = x: K beta/(1 + beta p_i) * (1/((1 - a)(1 + beta p_i)) - 1/(1 + beta)), the difference
    # rewritten as (a + K a (a/(1 - a) + 1 - p_i)) / ((1 - a)(1 + beta p_i)(1 + beta)).
    e_eq = K * beta / (1 + bpi) * (a + K * a * (a / (1 - a) + cpi)) / ((1 - a) * (1 + bpi) * (1 + beta))
    e_ne = -K * beta * bpi / ((1 - a) * (1 + bpi) ** 2)
    e_i = torch.where(eq, e_eq, e_ne)
    e_x = torch.where(eq, torch.zeros_like(beta), beta * beta / (1 + bpx))
    cd, ce, cx = g0 * c2 * beta, g0 * p_i * e_i, g0 * p_x * e_x
    return torch.stack([cd, ce, cx, ce * cpi, cx * cpx]).float()


# ---------------------------------------------------------------------------------------------
# Autograd functions
# ---------------------------------------------------------------------------------------------

def _finite_or_raise(loss: Tensor, op: str, what: str) -> None:
    bad = ~torch.isfinite(loss)
    if bool(bad.any()):
        raise FloatingPointError(f"{op}: non-finite values in {what} ({int(bad.sum())} of {loss.numel()} tokens "
                                 f"have a NaN/inf loss)")


def _rows(zt: Tensor, x0: Tensor, alpha_t: Tensor | float, dalpha_t: Tensor | float, K: int) -> tuple[Tensor, ...]:
    """Flattened ids and float64 per-token (a, da) of a (B, L) batch, with the ids checked."""
    torch._assert_async(((zt >= 0) & (zt < K) & (x0 >= 0) & (x0 < K)).all(), f"token ids out of range [0, {K})")
    return zt.reshape(-1).contiguous(), x0.reshape(-1).contiguous(), token_rows(alpha_t, zt), token_rows(dalpha_t, zt)


class _RBLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, zt: Tensor, x0: Tensor, a: Tensor, da: Tensor, impl: str, chunk: int,
                check: bool) -> Tensor:
        N, K = logits.shape
        beta = (K * a / (1 - a)).float()
        if impl == "triton":
            stats = _stats(logits, zt, x0, beta, impl)
        else:
            stats = torch.cat([_stats(logits[s:s + chunk], zt[s:s + chunk], x0[s:s + chunk], beta[s:s + chunk], impl)
                               for s in range(0, N, chunk)], 1) if N else logits.new_zeros((NUM_STATS, 0))
        loss = _loss_from_stats(stats, zt == x0, a, da, K)
        if check:
            _finite_or_raise(loss, "rb_loss", "the logits")
        ctx.save_for_backward(logits, zt, x0, a, da, beta, stats)
        ctx.impl, ctx.chunk = impl, chunk
        return loss.float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, zt, x0, a, da, beta, stats = ctx.saved_tensors
        N, K = logits.shape
        coefs = grad_coefficients(stats, zt == x0, a, da, K, grad.double())
        if ctx.impl == "triton":
            dl = _grad(logits, zt, x0, beta, stats, coefs, ctx.impl)
        else:
            dl = torch.empty_like(logits)
            for s in range(0, N, ctx.chunk):
                e = s + ctx.chunk
                g = _grad(logits[s:e], zt[s:e], x0[s:e], beta[s:e], stats[:, s:e], coefs[:, s:e], ctx.impl, out=dl[s:e])
                if g.data_ptr() != dl[s:e].data_ptr():
                    dl[s:e] = g
        return dl, None, None, None, None, None, None, None


class _RBLossLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, zt: Tensor, x0: Tensor, a: Tensor, da: Tensor,
                impl: str, chunk: int, check: bool) -> Tensor:
        N = h.shape[0]
        triton = impl == "triton"
        K = weight.shape[0]
        beta = (K * a / (1 - a)).float()
        stats = h.new_empty((NUM_STATS, N), dtype=torch.float32)
        if triton:                  # the fused kernels read W and h in place (no padded copy of W)
            weight, h = weight.contiguous(), (h if h.stride(1) == 1 else h.contiguous())
            bias_k = bias if bias is not None else weight.new_zeros(K)
        # One chunk on CPU: keep its logits for the backward (which overwrites them with the
        # gradient) instead of recomputing them: the same peak memory, one matmul fewer.
        keep = not triton and h.device.type == "cpu" and N <= chunk
        kept = None
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            if triton:              # the logits the backward's fused kernel recomputes, bit for bit
                from duo_fast.kernels.rb_loss import rb_logits_linear

                logits = rb_logits_linear(h[s:e], weight, bias_k)
            else:
                logits = torch.nn.functional.linear(h[s:e], weight, bias)
            stats[:, s:e] = _stats(logits, zt[s:e], x0[s:e], beta[s:e], impl)
            kept = logits if keep else None
            del logits
        loss = _loss_from_stats(stats, zt == x0, a, da, K)
        if check:
            _finite_or_raise(loss, "rb_loss_linear", "h, weight or bias")
        ctx.save_for_backward(h, weight, bias, zt, x0, a, da, beta, stats)
        ctx.impl, ctx.triton, ctx.chunk, ctx.kept, ctx.vocab = impl, triton, chunk, kept, K
        return loss.float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, bias, zt, x0, a, da, beta, stats = ctx.saved_tensors
        N = h.shape[0]
        K = ctx.vocab
        coefs = grad_coefficients(stats, zt == x0, a, da, K, grad.double())
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(h) if need_h else None
        # dW and db are written by the first chunk and accumulated by the others (no zero fill)
        new = torch.empty if N else torch.zeros
        dw = new((K, weight.shape[1]), dtype=torch.float32, device=h.device) if need_w else None
        db = new(K, dtype=torch.float32, device=h.device) if need_b and bias is not None else None
        for s in range(0, N, ctx.chunk):
            e = min(N, s + ctx.chunk)
            first = s == 0
            if ctx.triton:          # the logits recomputed in registers, never stored
                from duo_fast.kernels.rb_loss import rb_grad_linear

                dl = rb_grad_linear(h[s:e], weight, bias if bias is not None else weight.new_zeros(K), zt[s:e],
                                    x0[s:e], beta[s:e], stats[:, s:e].contiguous(), coefs[:, s:e].contiguous())
            else:
                logits = ctx.kept if ctx.kept is not None else torch.nn.functional.linear(h[s:e], weight, bias)
                ctx.kept = None
                dl = _grad(logits, zt[s:e], x0[s:e], beta[s:e], stats[:, s:e], coefs[:, s:e], ctx.impl, inplace=True)
                del logits
            if dw is not None and ctx.triton and dl.dtype != torch.float32:
                from duo_fast.kernels.gemm import matmul

                # bf16/fp16 products accumulated in fp32 straight into dW; the padded columns of the
                # gradient (zeros) are read too, so the operand's rows stay aligned; K rows are stored
                matmul(dl.t(), h[s:e], dw, accumulate=not first)
            dl = dl[:, :K]                              # the Triton path's chunks have padded columns
            if dh is not None:
                torch.mm(dl, weight, out=dh[s:e])
            if dw is not None and not (ctx.triton and dl.dtype != torch.float32):
                if dl.dtype == torch.float32:
                    if first:
                        torch.mm(dl.t(), h[s:e], out=dw)
                    else:
                        dw.addmm_(dl.t(), h[s:e])
                else:                                   # bf16/fp16 matmul (fp32 accumulation), summed in fp32
                    part = torch.mm(dl.t(), h[s:e])
                    if first:
                        dw.copy_(part)
                    else:
                        dw += part
            if db is not None:
                if first:
                    torch.sum(dl, 0, dtype=torch.float32, out=db)
                else:
                    db += dl.sum(0, dtype=torch.float32)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(h.dtype),
                None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public operators
# ---------------------------------------------------------------------------------------------

def _check_ids(zt: Tensor, x0: Tensor, shape: tuple[int, int]) -> None:
    if zt.shape != shape or x0.shape != shape:
        raise ValueError(f"zt {tuple(zt.shape)} and x0 {tuple(x0.shape)} must be (B, L) = {shape}")
    if zt.dtype != torch.int64 or x0.dtype != torch.int64:
        raise ValueError(f"zt and x0 must be int64, got {zt.dtype} and {x0.dtype}")


def _no_float64(t: Tensor, name: str) -> None:
    """The fused statistics are float32 by design (section 3): a float64 input would silently be
    computed in float32 (error ~1e-6), so it is refused; reference.rb_loss_ref is the float64 path."""
    if t.dtype == torch.float64:
        raise ValueError(f"{name} is float64, but the fused RB loss computes its statistics in float32 (error ~1e-6); "
                         f"use duo_fast.reference.rb_loss_ref for a float64 loss, or pass fp32/bf16/fp16")


def rb_loss(logits: Tensor, zt: Tensor, x0: Tensor, alpha_t: Tensor | float, dalpha_t: Tensor | float, *,
            impl: str = "auto", check: bool = False, chunk_tokens: int | None = None) -> Tensor:
    """Per-token USDM NELBO from logits.

    logits: (B, L, K) fp32/bf16/fp16 (float64 is refused: see ``_no_float64``); zt, x0: (B, L)
    int64 in [0, K); alpha_t in (0, 1) and
    dalpha_t = d alpha/dt < 0: scalars, (B,) per sequence or (B, L) per token. Returns (B, L)
    float32, differentiable with respect to ``logits`` (gradient in the logits' dtype).
    ``check=True`` raises ``FloatingPointError`` naming the op if a loss is NaN/inf (one host
    synchronisation). ``chunk_tokens``: rows per chunk of the PyTorch path.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, L, K), got {tuple(logits.shape)}")
    _no_float64(logits, "logits")
    B, L, K = logits.shape
    _check_ids(zt, x0, (B, L))
    z, x, a, da = _rows(zt, x0, alpha_t, dalpha_t, K)
    flat = logits.reshape(B * L, K)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    ran = backends.run_impl("rb_loss", logits, impl)
    chunk = chunk_tokens or default_chunk_tokens(K, logits.device)
    return _RBLoss.apply(flat, z, x, a, da, ran, chunk, check).view(B, L)


def rb_loss_linear(h: Tensor, weight: Tensor, bias: Tensor | None, zt: Tensor, x0: Tensor,
                   alpha_t: Tensor | float, dalpha_t: Tensor | float, *, impl: str = "auto", check: bool = False,
                   chunk_tokens: int | None = None) -> Tensor:
    """:func:`rb_loss` of ``logits = h @ weight.T + bias`` without the (B, L, K) logits.

    h: (B, L, D) (the output of the final adaLN-modulated norm, section 7); weight: (K, D);
    bias: (K,) or None. ``weight``/``bias`` are used in ``h``'s dtype (bf16 in, fp32 accumulation
    on GPU); gradients flow to all three. Returns (B, L) float32. ``check=True`` raises
    ``FloatingPointError`` if NaN/inf in h, weight or bias made a loss non-finite.
    """
    if h.dim() != 3 or weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"need h (B, L, D) and weight (K, D); got {tuple(h.shape)}, {tuple(weight.shape)}")
    B, L, D = h.shape
    K = weight.shape[0]
    if bias is not None and bias.shape != (K,):
        raise ValueError(f"bias must be ({K},), got {tuple(bias.shape)}")
    _no_float64(h, "h")
    _check_ids(zt, x0, (B, L))
    z, x, a, da = _rows(zt, x0, alpha_t, dalpha_t, K)
    w = weight.to(h.dtype)
    b = None if bias is None else bias.to(h.dtype)
    ran = backends.run_impl("rb_loss_linear", h, impl)
    chunk = chunk_tokens or default_chunk_tokens(K, h.device, h.element_size())
    return _RBLossLinear.apply(h.reshape(B * L, D), w, b, z, x, a, da, ran, chunk, check).view(B, L)
