"""Bench: the Rao-Blackwellized loss with the output projection, unfused vs duo_fast, in one run.

Unfused (what the public implementation does): ``logits = h @ W.T + b`` materialised in fp32,
the closed-form loss of section 3 over the (N, K) logits in PyTorch, autograd for the backward.
duo_fast: ``rb_loss`` on the same materialised logits, and ``rb_loss_linear`` (projection and
loss fused chunk by chunk: the logits never exist whole). Forward and forward+backward, time and
peak memory (above the inputs), ratios against the unfused path. The outputs are checked on the
benchmarked inputs against float64 (at most twice the unfused path's error): a benchmark of a
wrong result fails.

    python bench/bench_rb_loss.py [--device cpu] [--tokens 4096] [--vocab 30522] [--dim 256] [--dtype fp32]
"""

from __future__ import annotations

import argparse

import torch

from duo_fast import reference as ref
from duo_fast.bench.common import environment, peak_memory_mb, print_kernel_resources, print_table, time_fn, write_json
from duo_fast.ops import backend, rb_loss, rb_loss_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(device: torch.device, N: int, K: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, N, D, generator=g).to(device, dtype)
    w = (torch.randn(K, D, generator=g) * D ** -0.5).to(device)
    b = (torch.randn(K, generator=g) * 0.1).to(device)
    x0 = torch.randint(0, K, (1, N), generator=g)
    zt = torch.where(torch.rand(1, N, generator=g) < 0.5, x0, torch.randint(0, K, (1, N), generator=g)).to(device)
    a = (10 ** (-3 * torch.rand(1, N, generator=g, dtype=torch.float64))).clamp(max=1 - 1e-3).to(device)
    da = torch.full_like(a, -(1 - 1e-3))
    return h, w, b, zt, x0.to(device), a, da


def paths(h, w, b, zt, x0, a, da):
    """name -> function(h, w, b) returning the mean loss (autograd-ready)."""
    def unfused(h, w, b):
        logits = torch.nn.functional.linear(h, w.to(h.dtype), b.to(h.dtype)).float()
        return ref.rb_loss_ref(logits, zt, x0, a, da).mean()

    def from_logits(h, w, b):
        logits = torch.nn.functional.linear(h, w.to(h.dtype), b.to(h.dtype))
        return rb_loss(logits, zt, x0, a, da).mean()

    def fused(h, w, b):
        return rb_loss_linear(h, w, b, zt, x0, a, da).mean()

    return {"unfused (fp32 logits + reference loss)": unfused, "rb_loss (logits, fused loss)": from_logits,
            "rb_loss_linear (no logits)": fused}


def _exact(h, w, b, zt, x0, a, da, chunk: int = 256) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The float64 loss, d h and d W of the benchmarked inputs (their values in h's dtype),
    a chunk of tokens at a time."""
    hx, wx, bx = (t.detach().to(h.dtype).double().requires_grad_() for t in (h, w, b))
    N = h.shape[1]
    total = 0.0
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        lg = torch.nn.functional.linear(hx[:, s:e], wx, bx)
        loss = ref.rb_loss_ref(lg, zt[:, s:e], x0[:, s:e], a[:, s:e], da[:, s:e]).sum() / N
        loss.backward()
        total += float(loss.detach())
    return total, hx.grad.clone(), wx.grad.clone()


def run(device: torch.device, N: int, K: int, D: int, dtype: torch.dtype, repeats: int) -> dict:
    h, w, b, zt, x0, a, da = _inputs(device, N, K, D, dtype)
    fns = paths(h, w, b, zt, x0, a, da)
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]

    def fwd(f):
        with torch.no_grad():
            return f(h, w, b)

    def fwd_bwd(f):
        for t in leaves:
            t.grad = None
        f(*leaves).backward()

    # correctness on the benchmarked inputs: losses and d h of every path against the unfused one
    results = {}
    for name, f in fns.items():
        fwd_bwd(f)
        results[name] = (float(f(*leaves).detach()), leaves[0].grad.double().clone(), leaves[1].grad.double().clone())
    ex_loss, ex_dh, ex_dw = _exact(h, w, b, zt, x0, a, da)
    plain = results[next(iter(fns))]
    checks = {}
    for name, (loss, dh, dw) in results.items():
        checks[name] = {"loss_err": abs(loss - ex_loss) / abs(ex_loss),
                        "dh_err": float((dh - ex_dh).norm() / ex_dh.norm()),
                        "dw_err": float((dw - ex_dw).norm() / ex_dw.norm())}
    # the flash-attention/CCE rule: each path's error against float64 at most twice the unfused
    # path's error in the same dtype, plus two units of rounding of the float32 outputs
    base = checks[next(iter(fns))]
    slack = 2 * torch.finfo(torch.float32).eps
    ok = all(v <= 2 * base[k] + slack for c in checks.values() for k, v in c.items())
    del plain

    rows = []
    ref_f = ref_fb = None
    for name, f in fns.items():
        tf = time_fn(lambda f=f: fwd(f), device, repeats)["median_ms"]
        tfb = time_fn(lambda f=f: fwd_bwd(f), device, repeats)["median_ms"]
        mf = peak_memory_mb(lambda f=f: fwd(f), device)
        for t in leaves:                  # freed outside the measured call: frees of older blocks skew the CPU count
            t.grad = None
        mfb = peak_memory_mb(lambda f=f: f(*leaves).backward(), device)
        if ref_f is None:
            ref_f, ref_fb, ref_mf, ref_mfb = tf, tfb, mf, mfb
        rows.append({"case": name, "fwd_ms": tf, "fwd_bwd_ms": tfb, "speedup_fwd": ref_f / tf, "speedup_fwd_bwd": ref_fb / tfb,
                     "peak_fwd_mb": mf, "peak_fwd_bwd_mb": mfb, "mem_ratio_fwd": mf / ref_mf,
                     "mem_ratio_fwd_bwd": mfb / ref_mfb, "tokens_per_s_fwd_bwd": N / tfb * 1e3})
    logits_mb = N * K * 4 / 2**20
    return {"bench": "rb_loss", "env": environment(device), "backend": backend(device),
            "shape": {"tokens": N, "vocab": K, "dim": D, "dtype": str(dtype).replace("torch.", "")},
            "fp32_logits_mb": logits_mb, "checks": checks, "outputs_match": ok, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-resources", action="store_true",
                    help="skip the sm_90 compile of every kernel configuration (registers, spills, shared memory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(torch.device(args.device), args.tokens, args.vocab, args.dim, DTYPES[args.dtype], args.repeats)
    print(f"RB loss + output projection; N={args.tokens} K={args.vocab} D={args.dim} {args.dtype}; "
          f"fp32 logits would be {res['fp32_logits_mb']:.0f} MB; env {res['env']}; backend {res['backend']}")
    print_table(res["rows"], [("case", "case", "s"), ("fwd ms", "fwd_ms", ".1f"), ("fwd+bwd ms", "fwd_bwd_ms", ".1f"),
                              ("speed-up fwd", "speedup_fwd", ".2f"), ("speed-up fwd+bwd", "speedup_fwd_bwd", ".2f"),
                              ("peak fwd MB", "peak_fwd_mb", ".0f"), ("peak fwd+bwd MB", "peak_fwd_bwd_mb", ".0f"),
                              ("mem ratio fwd", "mem_ratio_fwd", ".3f"), ("mem ratio fwd+bwd", "mem_ratio_fwd_bwd", ".3f")])
    print("errors against float64: " + ", ".join(
        f"{k.split(' ')[0]}: loss {v['loss_err']:.1e} dh {v['dh_err']:.1e} dW {v['dw_err']:.1e}"
        for k, v in res["checks"].items()) + " (rule: at most 2x the unfused path's + 2 float32 ulp)")
    print_kernel_resources(res, "rb_loss", args.no_resources)
    write_json(args.json, res)
    if not res["outputs_match"]:
        raise SystemExit("an output is more than twice as far from float64 as the unfused path's: "
                         "the benchmark ran a wrong result")
    return res


if __name__ == "__main__":
    main()
