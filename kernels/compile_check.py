"""Compile every kernel configuration the dispatchers can pick, for a GPU target (default
Hopper, sm_90), on any machine: no GPU needed. Catches what the interpreter lets through
(dtype rules, layouts, unsupported ops) and reports registers and shared memory per config.

    python -m duo_fast.kernels.compile_check [--arch 90] [--jobs 2]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["configurations", "compile_one", "compile_all", "print_results", "resources_in_subprocess"]

_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _sample_posterior_configs() -> list[tuple[str, str, dict[str, str], dict[str, Any], int]]:
    """(kernel, label, signature, constexprs, num_warps) for kernels/sample_posterior.py."""
    from . import sample_posterior as sp

    out = []
    # logits kernel: every (BLOCK_M, BLOCK_K) logits_blocks() returns, plus every flag at the largest.
    blocks = sorted({sp.logits_blocks(K, interpret=False) for K in [2**i for i in range(1, 17)]})
    flag_sets = [(0, False, "fp32")] + [(f, p, "bf16") for f in (0, 1, 2) for p in (False, True)] + [(0, True, "fp16")]
    production = sp.logits_blocks(50257, interpret=False)          # GPT-2 vocabulary: every flag there
    for bm, bk in blocks:
        for final, psi, dt in (flag_sets if (bm, bk) == production else flag_sets[:1]):
            sig = {"logits_ptr": _PTR[dt], "stride_n": "i64", "zt_ptr": "*i64", "a_s_ptr": "*fp64", "a_t_ptr": "*fp64",
                   "kappa_ptr": "*fp64", "out_ptr": "*i64", "N": "i32", "K": "i32", "seed": "i64", "seed_ptr": "*i64",
                   "FINAL": "constexpr", "USE_PSI": "constexpr", "SEED_FROM_PTR": "constexpr", "BLOCK_M": "constexpr",
                   "BLOCK_K": "constexpr"}
            const = {"FINAL": final, "USE_PSI": psi, "SEED_FROM_PTR": (bm, bk) == production, "BLOCK_M": bm,
                     "BLOCK_K": bk}
            out.append(("_sample_posterior_kernel", f"{dt} M={bm} K={bk} final={final} psi={int(psi)}", sig, const,
                        8 if bk >= 2048 else 4))
    # fused-linear kernel: every (BLOCK_N, BLOCK_K, BLOCK_D) linear_blocks() returns, flags at the largest.
    lblocks = sorted({sp.linear_blocks(N, K, D, interpret=False) for N in (1, 64) for K in (2, 20, 40, 70, 128)
                      for D in (2, 20, 40, 64)})
    lflags = ([(0, False, True, "fp32")] + [(f, p, True, "bf16") for f in (0, 1, 2) for p in (False, True)]
              + [(0, True, False, "fp16")])
    lproduction = sp.linear_blocks(65536, 50257, 768, interpret=False)
    for bn, bk, bd in lblocks:
        for final, psi, bias, dt in (lflags if (bn, bk, bd) == lproduction else lflags[:1]):
            sig = {"h_ptr": _PTR[dt], "stride_hn": "i64", "w_ptr": _PTR[dt], "stride_wk": "i64", "b_ptr": _PTR[dt],
                   "zt_ptr": "*i64", "a_s_ptr": "*fp64", "a_t_ptr": "*fp64", "kappa_ptr": "*fp64", "out_ptr": "*i64",
                   "N": "i32", "K": "i32", "D": "i32", "seed": "i64", "seed_ptr": "*i64", "HAS_BIAS": "constexpr",
                   "FINAL": "constexpr", "USE_PSI": "constexpr", "IEEE": "constexpr", "SEED_FROM_PTR": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"}
            const = {"HAS_BIAS": bias, "FINAL": final, "USE_PSI": psi, "IEEE": dt == "fp32",
                     "SEED_FROM_PTR": (bn, bk, bd) == lproduction, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}
            out.append(("_sample_posterior_linear_kernel",
                        f"{dt} N={bn} K={bk} D={bd} final={final} psi={int(psi)} bias={int(bias)}", sig, const, 4))
    return out


def _rb_loss_configs() -> list[tuple[str, str, dict[str, str], dict[str, Any], int]]:
    """Every (BLOCK_M, BLOCK_K) of kernels/rb_loss.py's launchers, in fp32, bf16 and fp16."""
    from . import rb_loss as rb

    out = []
    ks = [2**i for i in range(1, 17)]
    for bm, bk in sorted({rb.stats_blocks(K, interpret=False) for K in ks}):
        for dt in ("fp32", "bf16", "fp16"):
            sig = {"logits_ptr": _PTR[dt], "stride_n": "i64", "zt_ptr": "*i64", "x0_ptr": "*i64", "beta_ptr": "*fp32",
                   "stats_ptr": "*fp32", "N": "i32", "K": "i32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
            out.append(("_rb_stats_kernel", f"{dt} M={bm} K={bk}", sig, {"BLOCK_M": bm, "BLOCK_K": bk}, 8))
    for bm, bk in sorted({rb.grad_blocks(K, interpret=False) for K in ks}):
        for dt in ("fp32", "bf16", "fp16"):
            sig = {"logits_ptr": _PTR[dt], "stride_n": "i64", "grad_ptr": _PTR[dt], "stride_gn": "i64",
                   "zt_ptr": "*i64", "x0_ptr": "*i64", "beta_ptr": "*fp32", "stats_ptr": "*fp32", "coef_ptr": "*fp32",
                   "N": "i32", "K": "i32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
            out.append(("_rb_grad_kernel", f"{dt} M={bm} K={bk}", sig, {"BLOCK_M": bm, "BLOCK_K": bk}, 4))
    return out


def _relaxed_configs() -> list[tuple[str, str, dict[str, str], dict[str, Any], int]]:
    """Every block configuration of kernels/relaxed_embedding.py's launchers; every flag and
    dtype at the production shape (GPT-2 vocabulary, D = 768), fp32 RNG path elsewhere."""
    from . import relaxed_embedding as re

    out = []
    ks, ns, ds = (20, 100, 600, 50257), (1, 100, 32768), (20, 70, 768)
    for bm, bk in sorted({re.stats_blocks(K, interpret=False) for K in ks}):
        for has_eps in (False, True):
            sig = {"x0_ptr": "*i64", "at_ptr": "*fp32", "st_ptr": "*fp32", "eps_ptr": "*fp32", "stride_en": "i64",
                   "zt_ptr": "*i64", "norm_ptr": "*fp32", "N": "i32", "K": "i32", "seed": "i64", "inv_tau": "fp32",
                   "HAS_EPS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
            out.append(("_re_stats_kernel", f"M={bm} K={bk} eps={int(has_eps)}", sig,
                        {"HAS_EPS": has_eps, "BLOCK_M": bm, "BLOCK_K": bk}, 4))
    prod = (re.fwd_blocks(32768, 50257, 768, interpret=False), re.bwd_blocks(32768, 50257, 768, interpret=False))
    flags = [(dt, sp, he) for dt in ("fp32", "bf16", "fp16") for sp in (False, True) for he in (False, True)]
    for kernel, blocks_of, prod_blocks in (("_re_fwd_kernel", re.fwd_blocks, prod[0]),
                                           ("_re_bwd_kernel", re.bwd_blocks, prod[1])):
        for bm, bk, bd in sorted({blocks_of(N, K, D, interpret=False) for N in ns for K in ks for D in ds}):
            for dt, sparse, has_eps in (flags if (bm, bk, bd) == prod_blocks else [("fp32", False, False)]):
                if kernel == "_re_fwd_kernel":
                    sig = {"x0_ptr": "*i64", "at_ptr": "*fp32", "st_ptr": "*fp32", "e_ptr": _PTR[dt], "stride_ek": "i64",
                           "eps_ptr": "*fp32", "stride_en": "i64", "zt_ptr": "*i64", "norm_ptr": "*fp32",
                           "h_ptr": _PTR[dt], "stride_hn": "i64"}
                else:
                    sig = {"x0_ptr": "*i64", "at_ptr": "*fp32", "st_ptr": "*fp32", "eps_ptr": "*fp32", "stride_en": "i64",
                           "norm_ptr": "*fp32", "dh_ptr": _PTR[dt], "stride_dn": "i64", "de_ptr": "*fp32",
                           "stride_dek": "i64"}
                sig.update({"N": "i32", "K": "i32", "D": "i32", "seed": "i64", "inv_tau": "fp32", "delta": "fp32",
                            "HAS_EPS": "constexpr", "SPARSE": "constexpr", "IEEE": "constexpr", "BLOCK_M": "constexpr",
                            "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"})
                const = {"HAS_EPS": has_eps, "SPARSE": sparse, "IEEE": dt == "fp32", "BLOCK_M": bm, "BLOCK_K": bk,
                         "BLOCK_D": bd}
                nw = re.warps(bm if kernel == "_re_fwd_kernel" else bk, bd)
                out.append((kernel, f"{dt} M={bm} K={bk} D={bd} sparse={int(sparse)} eps={int(has_eps)}", sig, const, nw))
    return out


def configurations() -> list[tuple[str, str, str, dict[str, str], dict[str, Any], int]]:
    """(module, kernel, label, signature, constexprs, num_warps) of every kernel configuration."""
    return ([("sample_posterior", *c) for c in _sample_posterior_configs()]
            + [("rb_loss", *c) for c in _rb_loss_configs()]
            + [("relaxed_embedding", *c) for c in _relaxed_configs()])


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread (from cuobjdump, when installed) of a cubin."""
    tool = shutil.which("cuobjdump")
    if tool is None:                    # triton's NVIDIA backend ships one
        import triton.backends.nvidia as nv

        bundled = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        tool = bundled if os.path.exists(bundled) else None
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    out = {}
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    if regs:
        out["registers"] = int(regs.group(1))
    if stack:
        out["stack_bytes"] = int(stack.group(1))       # local memory per thread: register spills
    return out


def compile_one(cfg: tuple, arch: int = 90, warp_size: int = 32) -> dict[str, Any]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel, label, sig, const, warps = cfg
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), kernel)
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                  target=GPUTarget("cuda", arch, warp_size), options={"num_warps": warps})
    except Exception as e:  # noqa: BLE001 - report every failing configuration
        return {"kernel": kernel, "config": label, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    res = {"kernel": kernel, "config": label, "ok": True, "seconds": time.perf_counter() - t0,
           "shared_bytes": int(getattr(compiled.metadata, "shared", 0)), "num_warps": warps}
    res.update(_resources(compiled.asm["cubin"]))
    return res


def compile_all(arch: int = 90, jobs: int = 1, only: str | None = None) -> list[dict[str, Any]]:
    """Compile every configuration (of the kernel modules whose name contains ``only``)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check must run without TRITON_INTERPRET=1")
    cfgs = [c for c in configurations() if only is None or only in c[0]]
    if jobs <= 1:
        return [compile_one(c, arch) for c in cfgs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, cfgs, [arch] * len(cfgs)))


def resources_in_subprocess(only: str, arch: int = 90, jobs: int = 2) -> list[dict[str, Any]]:
    """:func:`compile_all` in a fresh interpreter without TRITON_INTERPRET (benches call this:
    the JIT reads that variable at import)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "res.json")
        proc = subprocess.run([sys.executable, "-m", f"{__package__}.compile_check", "--arch", str(arch), "--jobs",
                               str(jobs), "--only", only, "--json", path], env=env, capture_output=True, text=True)
        if not os.path.exists(path):
            raise RuntimeError(f"compile_check failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        with open(path) as f:
            return json.load(f)


def print_results(results: list[dict[str, Any]]) -> None:
    for r in results:
        if r["ok"]:
            print(f"ok   {r['kernel']:34s} {r['config']:44s} regs {r.get('registers', '?'):>4} "
                  f"stack {r.get('stack_bytes', '?'):>4} B smem {r['shared_bytes']:>6} B  {r['seconds']:.1f}s")
        else:
            print(f"FAIL {r['kernel']:34s} {r['config']:44s} {r['error']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for Hopper")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--only", default=None, help="only the kernel modules whose name contains this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = compile_all(args.arch, args.jobs, args.only)
    print_results(results)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    failed = sum(not r["ok"] for r in results)
    print(f"{len(results) - failed} compiled, {failed} failed, target sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
