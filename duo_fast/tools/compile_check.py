"""Compile every kernel configuration the launchers can pick, for a GPU target (default Hopper,
sm_90a), on any machine: no GPU needed. Catches what the interpreter lets through (dtype rules,
layouts, unsupported ops) and reports registers, spills and shared memory per configuration.

Each kernel module lists the configurations its launchers can pick (``compile_calls()``: launcher
calls on ``meta`` tensors of the shapes that select them). Each is compiled exactly as the JIT
builds it at launch: the real launcher is called, its ``kernel[grid](...)`` call is
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

__all__ = ["configurations", "compile_one", "compile_all", "print_results", "resources_in_subprocess"]

def _kernel_modules() -> dict[str, Callable[[], list[tuple[str, Callable[[], Any]]]]]:
    """Every module of ``duo_fast.kernels`` that lists its launchers' configurations
    (``compile_calls()``): a new kernel module is covered by defining it, with no edit here."""
    import importlib
    import pkgutil

    import duo_fast.kernels as pkg

    out = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"duo_fast.kernels.{info.name}")
        if callable(getattr(module, "compile_calls", None)):
            out[info.name] = module.compile_calls
    return out


def configurations(only: str | None = None) -> list[tuple[str, str, str, Any]]:
    """(module, kernel, label, captured launch) of every distinct kernel configuration the
    launchers pick: the real launchers called on meta tensors, their launches captured (not run).
    Launches with the same block sizes, flags and argument types count once (the first one's
    shapes, hence its divisibility specialisation, are compiled)."""
    from duo_fast.tools.cost_model import capture_launches, specialization_key

    out, seen = [], set()
    for module, calls in _kernel_modules().items():
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
