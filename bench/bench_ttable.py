"""Bench: the T-table lookup, reference-style vs duo_fast, in one run.

Reference style (what the public implementation does): round gamma to the nearest of the
table's grid points, gather p, finite-difference the derivative from the neighbours, and check
the range with ``.item()`` (a host synchronisation) on every call. duo_fast: the custom op
``torch.ops.duo_fast.ttable_lookup`` (cubic Hermite from value and derivative tables, analytic
derivative, no synchronisation), and its pure-PyTorch fallback.

    python bench/bench_ttable.py [--device cpu|cuda] [--n 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from duo_fast import TTable
from duo_fast.bench.common import environment, print_table, time_fn, write_json
from duo_fast.bench.reference_paths import reference_ttable_lookup
from duo_fast.ops.ttable import lookup_backend, p_and_derivative


def run(device: torch.device, n: int, K: int, repeats: int) -> dict:
    table = TTable.build(K)
    p_table = (1.0 - table.q(device)).clone()
    gamma = torch.empty(n, dtype=torch.float64, device=device).uniform_(-5.0, -1.0)
    # accuracy against the quadrature evaluated directly at 2,000 of the points
    sub = gamma[:2000].cpu().numpy()
    p_true, dp_true = p_and_derivative(sub, K)
    a_true, d_true = (K * p_true - 1) / (K - 1), K / (K - 1) * dp_true

    def err(a, d):
        a, d = a[:2000].double().cpu().numpy(), d[:2000].double().cpu().numpy()
        return float(np.abs(a - a_true).max()), float((np.abs(d - d_true) / np.abs(d_true).clip(1e-300)).max())

    cases = {"reference (nearest, FD, .item())": lambda: reference_ttable_lookup(gamma, p_table, -5.0, -1.0, K),
             "duo_fast torch fallback": lambda: table.alpha_and_derivative(gamma, impl="torch")}
    if lookup_backend(device) == "cpp":
        cases["duo_fast C++/CUDA op"] = lambda: table.alpha_and_derivative(gamma, impl="cpp")
    rows = []
    base = None
    for name, fn in cases.items():
        t = time_fn(fn, device, repeats=repeats)
        ea, ed = err(*fn())
        base = base or t["median_ms"]
        rows.append({"case": name, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                     "speedup_vs_reference": base / t["median_ms"], "Mlookups_per_s": n / t["median_ms"] / 1e3,
                     "max_abs_err_alpha": ea, "max_rel_err_dalpha": ed})
    return {"bench": "ttable_lookup", "n": n, "vocab_size": K, "points": table.num_points, "env": environment(device),
            "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=1_000_000, help="gamma values per call")
    ap.add_argument("--vocab-size", type=int, default=50257)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    res = run(torch.device(args.device), args.n, args.vocab_size, args.repeats)
    print(f"T-table lookup, {args.n:,} gamma per call, K={args.vocab_size}, {res['points']:,} points, env {res['env']}")
    print_table(res["rows"], [("case", "case", "s"), ("median ms", "median_ms", ".3f"), ("p20", "p20_ms", ".3f"),
                              ("p80", "p80_ms", ".3f"), ("speed-up", "speedup_vs_reference", ".2f"),
                              ("Mlookup/s", "Mlookups_per_s", ".1f"), ("max |err alpha|", "max_abs_err_alpha", ".1e"),
                              ("max rel err dalpha", "max_rel_err_dalpha", ".1e")])
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
