"""Bench: the curriculum's relaxed input embedding, reference-style vs duo_fast, in one run.

Reference style (what the public implementation does): the one-hot of ``x`` and the Gaussian
noise materialised as (B, L, K) tensors, ``w = at onehot + st eps``, ``softmax(w / tau)`` and an
``einsum`` with the (K, D) embedding; autograd for ``d embedding``. duo_fast:
``ops.relaxed_embedding`` in each mode (Triton kernels on GPU; the chunked PyTorch path on CPU).
Forward + backward time and peak memory with ratios. Checked on the benchmarked inputs: the
dense path with the reference's own noise reproduces its output, and every mode's
``P(z_t = x)`` agrees with T (a benchmark of a wrong result fails).

    python bench/bench_relaxed.py [--device cpu] [--batch 8] [--length 128] [--vocab 30522] [--dim 256] [--tau 1e-3]
"""

from __future__ import annotations

import argparse
import math

import torch

from duo_fast import TTable
from duo_fast import reference as ref
from duo_fast.bench.common import environment, peak_memory_mb, print_kernel_resources, print_table, time_fn, write_json
from duo_fast.bench.reference_paths import reference_relaxed_embedding
from duo_fast.ops import backend, relaxed_embedding

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(device: torch.device, B: int, L: int, K: int, D: int, tau: float, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (B, L), generator=g).to(device)
    gamma = (-3.5 + 1.75 * torch.rand(B, generator=g, dtype=torch.float64)).to(device)
    E = (torch.randn(K, D, generator=g) * 0.02).to(device, dtype).requires_grad_()
    dh = torch.randn(B, L, D, generator=g).to(device, dtype)

    cases = {"reference style (materialised latents)": lambda: reference_relaxed_embedding(x0, gamma, tau, E)}
    for mode in ("dense", "sparse", "topk", "adaptive"):
        cases[f"relaxed_embedding {mode}"] = (lambda m: lambda: relaxed_embedding(x0, gamma, tau, E, seed=1, mode=m))(mode)

    def fwd_bwd(f):
        E.grad = None
        h, z = f()
        (h * dh).sum().backward()
        return z

    # correctness on the benchmarked inputs
    n_check = min(B, 2)
    eps = torch.randn(n_check, L, K, generator=g).to(device, dtype)
    h_ref, z_ref = reference_relaxed_embedding(x0[:n_check], gamma[:n_check], tau, E.detach(), eps=eps)
    h_ours, z_ours = relaxed_embedding(x0[:n_check], gamma[:n_check], tau, E.detach(), mode="dense", seed=0, eps=eps)
    h_exact, _ = ref.relaxed_embedding_ref(x0[:n_check], gamma[:n_check].double(), tau, E.detach().double(),
                                           eps=eps.double())
    rel = lambda a: float((a.double() - h_exact).norm() / h_exact.norm())          # noqa: E731
    dense_err, plain_err = rel(h_ours), rel(h_ref)
    table = TTable.build(K)
    p_true = table.alpha(gamma.double().cpu())
    p_true = (p_true + (1 - p_true) / K)[:, None].expand(B, L)
    expect, sd = float(p_true.sum()), math.sqrt(float((p_true * (1 - p_true)).sum()))
    checks = {"dense_err_vs_float64": dense_err, "reference_style_err_vs_float64": plain_err,
              "zt_equal": bool(torch.equal(z_ours, z_ref))}
    rows = []
    base = None
    for name, f in cases.items():
        z = fwd_bwd(f)
        hits = int((z.cpu() == x0.cpu()).sum())
        checks[f"{name}: P(z_t = x) deviation in sd"] = abs(hits - expect) / sd
        t = time_fn(lambda f=f: fwd_bwd(f), device, repeats)["median_ms"]
        m = peak_memory_mb(lambda f=f: fwd_bwd(f), device)
        base = base or (t, m)
        rows.append({"case": name, "fwd_bwd_ms": t, "speedup": base[0] / t, "peak_mb": m, "mem_ratio": m / base[1],
                     "tokens_per_s": B * L / t * 1e3})
    # the flash-attention/CCE rule: at most twice the plain path's error in the same dtype (+2 ulp)
    ok = (dense_err <= 2 * plain_err + 2 * torch.finfo(dtype).eps and checks["zt_equal"]
          and all(v <= 5 for k, v in checks.items() if k.endswith("in sd")))
    return {"bench": "relaxed_embedding", "env": environment(device), "backend": backend(device),
            "shape": {"batch": B, "length": L, "vocab": K, "dim": D, "tau": tau, "dtype": str(dtype).replace("torch.", "")},
            "checks": checks, "outputs_match": ok, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tau", type=float, default=1e-3)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-resources", action="store_true",
                    help="skip the sm_90 compile of every kernel configuration (registers, spills, shared memory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(torch.device(args.device), args.batch, args.length, args.vocab, args.dim, args.tau, DTYPES[args.dtype],
              args.repeats)
    print(f"relaxed embedding (forward + backward); B={args.batch} L={args.length} K={args.vocab} D={args.dim} "
          f"tau={args.tau} {args.dtype}; env {res['env']}; backend {res['backend']}")
    print_table(res["rows"], [("case", "case", "s"), ("fwd+bwd ms", "fwd_bwd_ms", ".1f"), ("speed-up", "speedup", ".2f"),
                              ("peak MB", "peak_mb", ".1f"), ("mem ratio", "mem_ratio", ".3f"),
                              ("tokens/s", "tokens_per_s", ",.0f")])
    print("checks: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                 for k, v in res["checks"].items()))
    print_kernel_resources(res, "relaxed_embedding", args.no_resources)
    write_json(args.json, res)
    if not res["outputs_match"]:
        raise SystemExit("a check failed: the benchmark ran a wrong result")
    return res


if __name__ == "__main__":
    main()
