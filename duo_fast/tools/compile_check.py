"""Compile every kernel configuration the launchers can pick, for a GPU target (default Hopper,
sm_90a), on any machine: no GPU needed. Catches what the interpreter lets through (dtype rules,
layouts, unsupported ops) and reports registers, spills and shared memory per configuration.

Each configuration is compiled exactly as the JIT builds it at launch: the real launcher is called
on ``meta`` tensors of the shapes that select the configuration, its ``kernel[grid](...)`` call is
captured, and Triton's own binder specialises it (``duo_fast.tools.cost_model.jit_compile``).

    python -m duo_fast.tools.compile_check [--arch 90] [--jobs 2] [--only MODULE]

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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from duo_fast.tools.cost_model import _meta  # meta tensors of the launch shapes, shared with the cost model

__all__ = ["configurations", "compile_one", "compile_all", "print_results", "resources_in_subprocess"]

_DT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, _DT[name])


def _sample_posterior_calls() -> list[tuple[str, Callable[[], Any]]]:
    """Launcher calls of kernels/sample_posterior.py: every block configuration its launchers can
    pick, and every flag and dtype at the production shape (GPT-2 vocabulary, N = 65536, D = 768)."""
    import torch

    from duo_fast.kernels import sample_posterior as sp

    out = []

    def logits_call(N: int, K: int, dt: str, final: int, psi: bool, seed_tensor: bool,
                    cut: bool = False) -> Callable[[], Any]:
        def call() -> Any:
            a = _meta(N, dtype=torch.float64)
            seed = _meta(1, dtype=torch.int64) if seed_tensor else 2**61 + 7
            return sp.sample_posterior_fwd(_meta(N, K, dtype=_dtype(dt)), _meta(N, dtype=torch.int64), a, a,
                                           a if psi else None, seed, final,
                                           cut=_meta(N, dtype=torch.float32) if cut else None)
        return call

    def cut_call(N: int, K: int, dt: str) -> Callable[[], Any]:
        return lambda: sp.nucleus_cut_fwd(_meta(N, K, dtype=_dtype(dt)), 0.9)

    def linear_call(N: int, K: int, D: int, dt: str, final: int, psi: bool, bias: bool,
                    seed_tensor: bool) -> Callable[[], Any]:
        def call() -> Any:
            a = _meta(N, dtype=torch.float64)
            seed = _meta(1, dtype=torch.int64) if seed_tensor else 2**61 + 7
            return sp.sample_posterior_linear_fwd(_meta(N, D, dtype=_dtype(dt)), _meta(K, D, dtype=_dtype(dt)),
                                                  _meta(K, dtype=_dtype(dt)) if bias else None,
                                                  _meta(N, dtype=torch.int64), a, a, a if psi else None, seed, final)
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


def _rb_loss_calls() -> list[tuple[str, Callable[[], Any]]]:
    """Every (BLOCK_M, BLOCK_K) of kernels/rb_loss.py's launchers in fp32, bf16 and fp16, at a
    chunk of the production shape (the op's GPU chunk of GPT-2 logits) and at small vocabularies."""
    import torch

    from duo_fast.kernels import gemm
    from duo_fast.kernels import rb_loss as rb

    out = []

    def call(N: int, K: int, dt: str, grad: bool) -> Callable[[], Any]:
        def run() -> Any:
            logits, z = _meta(N, K, dtype=_dtype(dt)), _meta(N, dtype=torch.int64)
            beta = _meta(N, dtype=torch.float32)
            if grad:
                return rb.rb_grad(logits, z, z, beta, _meta(9, N, dtype=torch.float32), _meta(5, N, dtype=torch.float32),
                                  out=logits)
            return rb.rb_stats(logits, z, z, beta)
        return run

    def linear_call(N: int, K: int, D: int, dt: str, what: str) -> Callable[[], Any]:
        def run() -> Any:
            h, w, b = _meta(N, D, dtype=_dtype(dt)), _meta(K, D, dtype=_dtype(dt)), _meta(K, dtype=_dtype(dt))
            Kp = rb.padded_vocab(K)
            if what == "logits":
                return rb.rb_logits_linear(h, w, b)
            if what == "grad":
                z, beta = _meta(N, dtype=torch.int64), _meta(N, dtype=torch.float32)
                return rb.rb_grad_linear(h, w, b, z, z, beta, _meta(9, N, dtype=torch.float32),
                                         _meta(5, N, dtype=torch.float32))
            return gemm.matmul(_meta(N, Kp, dtype=_dtype(dt)).t(), h, _meta(K, D, dtype=torch.float32), True,
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


def _relaxed_calls() -> list[tuple[str, Callable[[], Any]]]:
    """Every block configuration of kernels/relaxed_embedding.py's launchers; every flag and dtype
    at the production shape (N = 16384 tokens, GPT-2 vocabulary, D = 768)."""
    import torch

    from duo_fast.kernels import relaxed_embedding as re_k

    out = []

    def call(N: int, K: int, D: int, dt: str, sparse: bool, has_eps: bool, backward: bool,
             ieee: bool = False) -> Callable[[], Any]:
        def run() -> Any:
            x0, at = _meta(N, dtype=torch.int64), _meta(N, dtype=torch.float32)
            eps = _meta(N, K, dtype=torch.float32) if has_eps else None
            if backward:
                return re_k.relaxed_bwd(x0, at, at, _meta(2, N, dtype=torch.float32), _meta(N, D, dtype=_dtype(dt)), K,
                                        1e-3, 2**61 + 7, sparse, eps, ieee=ieee)
            return re_k.relaxed_fwd(x0, at, at, _meta(K, D, dtype=_dtype(dt)), 1e-3, 2**61 + 7, sparse, eps, ieee=ieee)
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


def _relaxed_topk_calls() -> list[tuple[str, Callable[[], Any]]]:
    """Every column count of kernels/relaxed_topk.py's launcher (k_max rounded up to a power of
    two), at small and production shapes."""
    import torch

    from duo_fast.kernels import relaxed_topk as rt

    def call(N: int, K: int, k_max: int) -> Callable[[], Any]:
        def run() -> Any:
            x0, at = _meta(N, dtype=torch.int64), _meta(N, dtype=torch.float32)
            return rt.adaptive_topk(x0, at, at, K, 1e-3, 1e-6, k_max, 2**61 + 7)
        return run

    return [(f"adaptive N={N} K={K} k_max={k}", call(N, K, k)) for N in (1, 100, 16384) for K in (20, 100, 50257)
            for k in (1, 2, 8, 19, 32, 64)]


def _gemm_calls() -> list[tuple[str, Callable[[], Any]]]:
    """kernels/gemm.py on its own: every operand dtype, with and without accumulation, skip flags
    and a ragged K, at its users' production shapes and small ones."""
    import torch

    from duo_fast.kernels import gemm

    out = []

    def call(M: int, N_out: int, K: int, dt: str, accumulate: bool, flags: bool, transposed: bool) -> Callable[[], Any]:
        def run() -> Any:
            a = _meta(K, M, dtype=_dtype(dt)).t() if transposed else _meta(M, K, dtype=_dtype(dt))
            c = _meta(M, N_out, dtype=torch.float32 if accumulate else _dtype(dt))
            f = _meta(-(-M // gemm.FLAG_BLOCK), -(-K // gemm.FLAG_BLOCK), dtype=torch.int8) if flags else None
            return gemm.matmul(a, _meta(K, N_out, dtype=_dtype(dt)), c, accumulate, ieee=dt == "fp32", flags=f)
        return run

    for dt in ("bf16", "fp16", "fp32"):
        for M, N_out, K in ((16384, 768, 50304), (50304, 768, 2560), (100, 70, 300), (37, 20, 50)):
            for accumulate in (False, True):
                for flags in (False, True):
                    out.append((f"mm {dt} M={M} N={N_out} K={K} acc={int(accumulate)} skip={int(flags)}",
                                call(M, N_out, K, dt, accumulate, flags, accumulate)))
    return out


_CALLS = {"gemm": _gemm_calls, "sample_posterior": _sample_posterior_calls, "rb_loss": _rb_loss_calls,
          "relaxed_embedding": _relaxed_calls, "relaxed_topk": _relaxed_topk_calls}


def configurations(only: str | None = None) -> list[tuple[str, str, str, Any]]:
    """(module, kernel, label, captured launch) of every distinct kernel configuration the
    launchers pick: the real launchers called on meta tensors, their launches captured (not run).
    Launches with the same block sizes, flags and argument types count once (the first one's
    shapes, hence its divisibility specialisation, are compiled)."""
    from duo_fast.tools.cost_model import capture_launches, specialization_key

    out, seen = [], set()
    for module, calls in _CALLS.items():
        if only is not None and only not in module:
            continue
        for label, call in calls():
            for launch in capture_launches(call):
                key = (launch.kernel, specialization_key(launch, alignment=False))
                if key not in seen:
                    seen.add(key)
                    out.append((module, launch.kernel, label, launch))
    return out


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


def compile_one(cfg: tuple, arch: int = 90) -> dict[str, Any]:
    """Compile one captured launch as the JIT would for ``sm_{arch}a``; registers, spills, shared memory."""
    from duo_fast.tools.cost_model import jit_compile

    module, kernel, label, launch = cfg
    t0 = time.perf_counter()
    try:
        comp = jit_compile(launch, arch)
    except Exception as e:  # noqa: BLE001 - report every failing configuration
        return {"kernel": kernel, "config": label, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    res = {"kernel": kernel, "config": label, "ok": True, "seconds": time.perf_counter() - t0,
           "shared_bytes": comp["shared_bytes"], "num_warps": comp["num_warps"],
           "constexprs": {k: v for k, v in comp["constexprs"].items() if k.isupper()},
           "divisible_by_16": comp["divisible_by_16"]}
    res.update(_resources(comp["cubin"]))
    return res


def _compile_index(args: tuple[int, int, str | None]) -> dict[str, Any]:
    i, arch, only = args
    return compile_one(configurations(only)[i], arch)


def compile_all(arch: int = 90, jobs: int = 1, only: str | None = None) -> list[dict[str, Any]]:
    """Compile every configuration (of the kernel modules whose name contains ``only``)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check must run without TRITON_INTERPRET=1")
    cfgs = configurations(only)
    if jobs <= 1:
        return [compile_one(c, arch) for c in cfgs]
    with ProcessPoolExecutor(jobs) as pool:                  # launches do not pickle: workers rebuild them
        return list(pool.map(_compile_index, [(i, arch, only) for i in range(len(cfgs))]))


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
            print(f"ok   {r['kernel']:34s} {r['config'][:56]:56s} regs {r.get('registers', '?'):>4} "
                  f"stack {r.get('stack_bytes', '?'):>4} B smem {r['shared_bytes']:>6} B  {r['seconds']:.1f}s")
        else:
            print(f"FAIL {r['kernel']:34s} {r['config'][:56]:56s} {r['error']}")


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
    print(f"{len(results) - failed} compiled, {failed} failed, target sm_{args.arch}a")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
