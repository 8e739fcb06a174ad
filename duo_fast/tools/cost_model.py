"""A static H100 cost model of duo_fast's kernels: what a GPU run would cost, judged on a machine
with no GPU. Static estimates, never measurements.

    python -m duo_fast.tools.cost_model [--only MODULE] [--json PATH]

1. **Compile exactly what runs.** Each operator's real launcher (``kernels/*.py``) is called at the
   GPU shapes of the small preset with ``meta`` tensors; every ``kernel[grid](...)`` it makes is
   captured instead of launched. The captured arguments go through Triton's own JIT binder for an
   sm_90a target (the same code ``JITFunction.run`` uses: 16-byte divisibility of pointers and
   integers, i32/i64 by value, ``do_not_specialize``), and the result is compiled with
   ``triton.compile``: the kernel a launch on an H100 would build. Pointers are given the
   alignment of a fresh CUDA allocation plus their storage offset.
2. **Read the SASS** (``cuobjdump -sass`` of the cubin): registers and stack (``-res-usage``),
   loops (backward branches) and their nesting, spills (``LDL``/``STL``) inside loops, tensor-core
   instructions (``HGMMA``/``HMMA`` and their precision), instruction counts per loop body.
3. **Estimate** each launch: executed warp-instructions = warps x (straight-line code + each loop
   body x its trip count, known from the block sizes); issue time = those instructions at one per
   scheduler per cycle on the resident warps, by waves of CTAs (occupancy from registers and shared
   memory); HBM time = bytes moved / bandwidth; tensor time = dot FLOPs / bf16 peak; MUFU time =
   the special-function instructions (exp2, log2, reciprocal, ...) at 16 lanes per SM per cycle.
   The estimate is the largest of the four. The **floor** of an operator is its unavoidable work at the roofline:
   max(its compulsory bytes / bandwidth, its GEMM FLOPs / bf16 peak).
4. **Reference style**: what the public implementation does, as a list of GEMMs (at the bf16 peak)
   and materialised elementwise passes (at the HBM bandwidth): a lower bound for it, so every ratio
   against it is conservative in its favour.
5. **Whole step**: the denoiser's GEMMs and attention (FLOPs from the config, at an assumed
   efficiency) plus the operators, for a training micro-step (curriculum and discrete) and a
   sampling step of the small model.

Every constant is in :data:`H100`. Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from duo_fast.kernels._common import meta as _meta  # meta tensors of the launch shapes

__all__ = ["H100", "SHAPES", "capture_launches", "jit_compile", "specialization_key", "analyse_sass",
           "estimate_launch", "op_reports", "whole_step", "report", "main"]

# H100 SXM (dense figures; vendor data sheet, clock the sustained boost the model assumes)
H100 = {
    "sms": 132, "schedulers_per_sm": 4, "clock_hz": 1.755e9, "hbm_bytes_per_s": 3.35e12, "bf16_flops": 989e12,
    "regs_per_sm": 65536, "max_warps_per_sm": 64, "max_ctas_per_sm": 32, "smem_per_sm": 228 * 1024,
    "smem_reserved_per_cta": 1024, "l2_bytes": 50 * 2**20, "gemm_efficiency": 0.6, "fp32_flops": 67e12,
    "mufu_lanes_per_sm": 16,
}
H100_NOTES = {
    "clock_hz": "sustained SM clock assumed for issue time", "gemm_efficiency":
    "fraction of the bf16 peak assumed for the denoiser's cuBLAS/attention work in the whole-step estimate "
    "(the operators' own GEMMs are taken at the peak: a floor)",
    "fp32_flops": "FP32 (non-tensor-core) peak: float32 matmuls with TF32 off, PyTorch's default",
    "mufu_lanes_per_sm": "special-function (MUFU: ex2, lg2, rcp, sin, ...) results per cycle per SM: a warp's "
    "MUFU instruction occupies its pipe for 8 cycles",
}

# the GPU shapes of the small preset
SHAPES = {"L": 1024, "K": 50257, "D": 768, "N_train": 16384, "N_sample": 65536}


# ---------------------------------------------------------------------------------------------
# 1. Capture the launches and compile them as the JIT would
# ---------------------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: str
    fn: Any = field(repr=False)
    args: tuple = field(repr=False)
    kwargs: dict = field(repr=False)
    grid: tuple[int, ...] = ()


def capture_launches(call: Callable[[], Any]) -> list[Launch]:
    """Run ``call`` (a launcher on meta tensors) with every Triton launch recorded, not run."""
    from triton.runtime.jit import JITFunction

    seen: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        g = grid(dict(zip([p.name for p in self.params], args))) if callable(grid) else grid
        seen.append(Launch(self.fn.__name__, self, args, dict(kwargs), tuple(int(x) for x in g)))

    JITFunction.run = record
    try:
        call()
    finally:
        JITFunction.run = original
    return seen


def _bind(launch: Launch, arch: int) -> tuple[Any, dict, list, Any]:
    """(backend, bound arguments, specialisation, options) of ``launch`` from Triton's own binder
    for ``sm_{arch}a``, tensors given as aligned pointer probes."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    args = [_PointerProbe(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    bound, specialization, options = binder(*args, **launch.kwargs)
    return backend, bound, specialization, options


def specialization_key(launch: Launch, arch: int = 90, alignment: bool = True) -> str:
    """The JIT's cache key material for ``launch``: argument types and specialisations, options
    (``alignment=False``: types and constexprs only, without the divisibility marks)."""
    _, _, specialization, options = _bind(launch, arch)
    if not alignment:
        specialization = [(t, v) if t == "constexpr" else (t,) for t, v in specialization]
    return repr((specialization, sorted(options.items())))


class _PointerProbe:
    """Stands for a CUDA tensor in Triton's binder: its dtype and the address a fresh allocation
    (256-byte aligned) plus the tensor's storage offset would have."""

    def __init__(self, t: Any) -> None:
        self.dtype = t.dtype
        self._ptr = 1 << 20 | (t.storage_offset() * t.element_size())

    def data_ptr(self) -> int:
        return self._ptr


def _pack_args(fn: Any, backend: Any, kwargs: dict, bound: dict, specialization: list, options: Any) -> tuple:
    """(options, signature, constexprs, attrs) as ``JITFunction.run`` derives them: its own method
    where Triton has one (3.4 and later), the same steps written out for Triton 3.3."""
    if hasattr(fn, "_pack_args"):
        return fn._pack_args(backend, kwargs, bound, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in specialization]
    signature = dict(zip([p.name for p in fn.params], sigvals))
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, val: val == "constexpr")}
    attrvals = [x[1] for x in specialization]
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k))
             for k in find_paths_if(attrvals, lambda _, x: isinstance(x, str))}
    return options, signature, constexprs, attrs


def jit_compile(launch: Launch, arch: int = 90) -> dict[str, Any]:
    """The specialisation the JIT applies to ``launch`` on ``sm_{arch}a``, and its compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend, bound, specialization, options = _bind(launch, arch)
    options, signature, constexprs, attrs = _pack_args(launch.fn, backend, launch.kwargs, bound, specialization,
                                                       options)
    compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    names = [p.name for p in launch.fn.params]
    return {"signature": signature, "divisible_by_16": sorted(names[k[0]] for k, v in attrs.items() if v),
            "constexprs": {names[k[0]]: v for k, v in constexprs.items()}, "num_warps": options.num_warps,
            "shared_bytes": int(compiled.metadata.shared), "cubin": compiled.asm["cubin"],
            "ptx_cp_async": compiled.asm["ptx"].count("cp.async"), "arch": f"sm_{arch}a"}


# ---------------------------------------------------------------------------------------------
# 2. Read the SASS
# ---------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    import triton.backends.nvidia as nv

    bundled = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    if os.path.exists(bundled):
        return bundled
    raise FileNotFoundError(f"{name} is not installed (it ships with CUDA and with Triton's NVIDIA backend)")


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _sass(cubin: bytes) -> tuple[list[tuple[int, str]], dict[str, int]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    instrs = [(int(m.group(1), 16), m.group(2)) for m in _LINE.finditer(text)]
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return instrs, usage


def _opcode(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def analyse_sass(cubin: bytes) -> dict[str, Any]:
    """Loops (with nesting depth and exclusive body sizes), spills, tensor-core ops, registers."""
    instrs, usage = _sass(cubin)
    addrs = [a for a, _ in instrs]
    exits = [a for a, t in instrs if _opcode(t) == "EXIT" and not t.startswith("@")]
    main_end = exits[-1] if exits else addrs[-1]                   # code after it: called subroutines (cold)
    loops = []
    for a, t in instrs:
        if _opcode(t) == "BRA" and a <= main_end:
            m = re.search(r"0x([0-9a-f]+)", t)
            target = int(m.group(1), 16) if m else a
            if target <= a:
                loops.append({"start": target, "end": a})
    loops = [lp for i, lp in enumerate(loops) if lp not in loops[:i]]
    for lp in loops:
        lp["depth"] = sum(o is not lp and o["start"] <= lp["start"] and lp["end"] <= o["end"] for o in loops)
        body = [(a, t) for a, t in instrs if lp["start"] <= a <= lp["end"]]
        inner = [o for o in loops if o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"]]
        excl = [(a, t) for a, t in body if not any(o["start"] <= a <= o["end"] for o in inner)]
        lp["instructions"] = len(excl)
        lp["innermost"] = not inner
        ops = [_opcode(t) for _, t in excl]
        lp["spills"] = sum(o.startswith(("LDL", "STL")) for o in ops)
        lp["tensor_core"] = sum(o.startswith(("HGMMA", "HMMA")) for o in ops)
        lp["mufu"] = sum(o.startswith("MUFU") for o in ops)
        lp["skippable"] = _largest_forward_region(excl)
    straight = [(a, t) for a, t in instrs if a <= main_end and not any(lp["start"] <= a <= lp["end"] for lp in loops)]
    tc = sorted({_opcode(t) for _, t in instrs if _opcode(t).startswith(("HGMMA", "HMMA"))})
    return {"registers": usage.get("REG", 0), "stack_bytes": usage.get("STACK", 0), "loops": loops,
            "straight_instructions": len(straight), "total_instructions": len(instrs),
            "straight_mufu": sum(_opcode(t).startswith("MUFU") for _, t in straight),
            "spills_total": sum(_opcode(t).startswith(("LDL", "STL")) for _, t in instrs),
            "tensor_core_ops": tc, "uses_tensor_cores": bool(tc)}


def _largest_forward_region(body: list[tuple[int, str]]) -> int:
    """Instructions under the largest forward conditional branch of a loop body (a skippable tile)."""
    best = 0
    for a, t in body:
        if _opcode(t) == "BRA" and t.startswith("@"):
            m = re.search(r"0x([0-9a-f]+)", t)
            if m and int(m.group(1), 16) > a:
                best = max(best, sum(a < b < int(m.group(1), 16) for b, _ in body))
    return best


# ---------------------------------------------------------------------------------------------
# 3. Estimates
# ---------------------------------------------------------------------------------------------

def occupancy(registers: int, warps: int, shared: int) -> dict[str, int]:
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = H100["regs_per_sm"] // regs_per_warp // warps
    by_smem = H100["smem_per_sm"] // (shared + H100["smem_reserved_per_cta"])
    ctas = max(0, min(by_regs, by_smem, H100["max_ctas_per_sm"], H100["max_warps_per_sm"] // warps))
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps}


def estimate_launch(sass: dict[str, Any], warps: int, shared: int, grid: tuple[int, ...], trips: list[int],
                    flops: float, hbm_bytes: float, skip_fraction: float = 0.0,
                    loop_weights: list[float] | None = None) -> dict[str, Any]:
    """``trips[d]``: iterations of a depth-``d`` loop per enclosing iteration; ``skip_fraction``:
    share of innermost iterations whose skippable region is not executed (sparse kernels);
    ``loop_weights[i]``: share of programs that run loop ``i`` (in SASS order) at all, for loops
    in mutually exclusive branches (default 1 each: every loop runs)."""
    per_warp = float(sass["straight_instructions"])
    mufu_per_warp = float(sass.get("straight_mufu", 0))
    for i, lp in enumerate(sass["loops"]):
        # loops deeper than the kernel's own (barrier/mbarrier wait loops of a few instructions) count once
        n = math.prod(trips[:min(lp["depth"], len(trips) - 1) + 1]) * (loop_weights[i] if loop_weights else 1.0)
        body = lp["instructions"] - (skip_fraction * lp["skippable"] if lp["innermost"] else 0.0)
        per_warp += n * body
        mufu_per_warp += n * lp.get("mufu", 0)           # never discounted for skipped regions: conservative
    occ = occupancy(sass["registers"], warps, shared)
    ctas = math.prod(grid)
    if occ["ctas_per_sm"] == 0:
        raise ValueError("the kernel does not fit on an SM")
    waves = math.ceil(ctas / (H100["sms"] * occ["ctas_per_sm"]))
    resident = min(ctas, H100["sms"] * occ["ctas_per_sm"]) / H100["sms"]         # CTAs per SM in a full wave
    issue_rate = min(H100["schedulers_per_sm"], resident * warps)                   # warp-instructions per cycle
    issue_s = waves * (resident * warps * per_warp) / issue_rate / H100["clock_hz"]
    hbm_s = hbm_bytes / H100["hbm_bytes_per_s"]
    tensor_s = flops / H100["bf16_flops"] if sass["uses_tensor_cores"] else 0.0
    # the MUFU pipe: every lane's special-function result at mufu_lanes_per_sm per cycle, all SMs busy
    mufu_s = mufu_per_warp * warps * ctas * 32 / (H100["mufu_lanes_per_sm"] * H100["sms"] * H100["clock_hz"])
    spills_hot = sum(lp["spills"] for lp in sass["loops"])
    times = (issue_s, hbm_s, tensor_s, mufu_s)
    return {"warp_instructions": per_warp * warps * ctas, "issue_ms": issue_s * 1e3, "hbm_ms": hbm_s * 1e3,
            "tensor_ms": tensor_s * 1e3, "mufu_ms": mufu_s * 1e3, "estimate_ms": max(times) * 1e3,
            "bound": ("issue", "hbm", "tensor", "mufu")[max(range(4), key=lambda i: times[i])],
            "waves": waves, "hot_loop_spills": spills_hot, **occ}


def _gemm(name: str, m: int, n: int, k: int, in_bytes: int = 2, out_bytes: int = 2,
          rate: str = "bf16_flops") -> dict[str, Any]:
    flops = 2.0 * m * n * k
    data = (m * k + n * k) * in_bytes + m * n * out_bytes
    ms = max(flops / H100[rate], data / H100["hbm_bytes_per_s"]) * 1e3
    return {"step": name, "kind": "gemm", "flops": flops, "hbm_bytes": data, "estimate_ms": ms}


def _pass(name: str, elements: float, bytes_per_element: float) -> dict[str, Any]:
    data = elements * bytes_per_element
    return {"step": name, "kind": "elementwise", "flops": 0.0, "hbm_bytes": data,
            "estimate_ms": data / H100["hbm_bytes_per_s"] * 1e3}


# ---------------------------------------------------------------------------------------------
# 4. The operators: our launches and the reference-style path, at the GPU shapes
# ---------------------------------------------------------------------------------------------

def _triton_step(name: str, call: Callable[[], Any], model: Callable[[Launch], dict[str, Any]],
                 arch: int) -> list[dict[str, Any]]:
    """Compile every launch ``call`` makes and estimate it; ``model(launch)`` gives trips, FLOPs,
    bytes and the skip fraction of that launch."""
    out = []
    compiled: dict[str, tuple[dict, dict]] = {}         # launches of one kernel that specialise alike compile once
    for launch in capture_launches(call):
        key = launch.kernel + specialization_key(launch, arch)
        if key not in compiled:
            comp = jit_compile(launch, arch)
            compiled[key] = (comp, analyse_sass(comp["cubin"]))
        comp, sass = compiled[key]
        m = model(launch)
        weights = m["loop_weights"](sass["loops"]) if "loop_weights" in m else None
        est = estimate_launch(sass, comp["num_warps"], comp["shared_bytes"], launch.grid, m["trips"], m["flops"],
                              m["hbm_bytes"], m.get("skip_fraction", 0.0), weights)
        elems = m.get("elements_per_iteration")
        # SASS instructions per element of the main (outermost) loop's tile, nested loops expanded,
        # loops of exclusive branches by the share of programs that run them
        main_iter = sum(lp["instructions"] * math.prod(m["trips"][1:min(lp["depth"], len(m["trips"]) - 1) + 1])
                        * (weights[i] if weights else 1.0) for i, lp in enumerate(sass["loops"]))
        out.append({"step": f"{name}: {launch.kernel}", "kind": "triton", "kernel": launch.kernel,
                    "config": {k: v for k, v in comp["constexprs"].items() if k.isupper()}, "grid": launch.grid,
                    "num_warps": comp["num_warps"], "registers": sass["registers"], "stack_bytes": sass["stack_bytes"],
                    "shared_bytes": comp["shared_bytes"], "tensor_core_ops": sass["tensor_core_ops"],
                    "has_dot": m.get("has_dot", False), "loops": [{k: lp[k] for k in ("depth", "instructions", "spills",
                                                                                      "tensor_core", "skippable")}
                                                                  for lp in sass["loops"]],
                    "instructions_per_element": (main_iter * comp["num_warps"] * 32 / elems
                                                 if elems and sass["loops"] else None),
                    "divisible_by_16": comp["divisible_by_16"], "signature": comp["signature"],
                    "flops": m["flops"], "hbm_bytes": m["hbm_bytes"], "assumption": m.get("assumption"), **est})
    return out


def _posterior_linear(dtype_name: str, arch: int, psi: bool = False) -> dict[str, Any]:
    """``dtype_name``: the parameters'. On CUDA the denoiser's hidden state is bf16 (autocast), and
    ``ops.sample_posterior_linear`` casts the weight to it: fp32 parameters add that cast. ``psi``:
    the Psi mixture (a per-token kappa read, the same single pass)."""
    import torch

    from duo_fast.kernels import sample_posterior as sp

    N, K, D = SHAPES["N_sample"], SHAPES["K"], SHAPES["D"]
    dt, es = torch.bfloat16, 2
    h, w, b = _meta(N, D, dtype=dt), _meta(K, D, dtype=dt), _meta(K, dtype=dt)
    zt, a = _meta(N, dtype=torch.int64), _meta(N, dtype=torch.float64)
    seed = _meta(1, dtype=torch.int64)

    def model(launch: Launch) -> dict[str, Any]:
        c = launch.kwargs
        bn, bk, bd = c["BLOCK_N"], c["BLOCK_K"], c["BLOCK_D"]
        ctas = math.prod(launch.grid)
        w_bytes = K * D * es
        w_reads = max(1, math.ceil(ctas / H100["sms"])) if w_bytes > H100["l2_bytes"] else 1
        return {"trips": [math.ceil(K / bk), math.ceil(D / bd)], "flops": 2.0 * N * math.ceil(K / bk) * bk * D,
                "hbm_bytes": N * D * es + w_bytes * w_reads + N * (8 + 8 + 8 + 8), "has_dot": True,
                "elements_per_iteration": bn * bk,
                "assumption": f"W ({w_bytes / 1e6:.0f} MB) exceeds L2: read once per wave ({w_reads} waves)"}

    steps = []
    if dtype_name == "fp32":           # the op casts the fp32 weight to the hidden state's dtype each call
        steps.append(_pass("weight cast fp32 -> bf16", K * D, 4 + 2))
    steps += _triton_step("posterior + projection",
                          lambda: sp.sample_posterior_linear_fwd(h, w, b, zt, a, a, a if psi else None, seed, 0), model,
                          arch)
    floor = max(2.0 * N * K * D / H100["bf16_flops"], (N * D * es + K * D * es) / H100["hbm_bytes_per_s"]) * 1e3
    ref = [_gemm("logits = h W^T (bf16 autocast)", N, K, D),
           *_public_posterior_passes(N * K)]
    if psi:            # the public Psi step: a second float64 posterior (s = 0), its forward noising, the mix
        nk = N * K
        ref += [_pass("posterior at s = 0 (float64, elementwise)", nk, 9 * 16), _pass("a_s q0 + (1 - a_s)/K", nk, 16),
                _pass("kappa q + (1 - kappa) pc", nk, 3 * 16)]
    return {"op": "posterior step + projection" + (" (Psi)" if psi else ""), "dtype": dtype_name, "N": N,
            "ours": steps, "reference": ref, "floor_ms": floor}


def _posterior_nucleus(arch: int) -> dict[str, Any]:
    """Nucleus sampling (top-p 0.9) of one step from the hidden state, bf16: the logits are written
    (one GEMM), each row's cut found by bisection (33 passes over the row: counted as HBM reads,
    no L2 reuse assumed) and the logits kernel draws above the cut. Reference: the public
    ``top_k_top_p_filtering`` on float64 log-probabilities (a sort of 64-bit keys and int64 ids)
    and its float64 posterior."""
    import torch

    from duo_fast.kernels import sample_posterior as sp

    N, K, D = SHAPES["N_sample"], SHAPES["K"], SHAPES["D"]
    nk = N * K
    logits = _meta(N, K, dtype=torch.bfloat16)
    zt, a = _meta(N, dtype=torch.int64), _meta(N, dtype=torch.float64)
    cut, seed = _meta(N, dtype=torch.float32), _meta(1, dtype=torch.int64)

    def cut_model(launch: Launch) -> dict[str, Any]:
        bm, bk = launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_K"]
        return {"trips": [33, math.ceil(K / bk)], "flops": 0.0, "hbm_bytes": 34 * nk * 2 + N * 4,
                "elements_per_iteration": bm * bk,
                "assumption": "33 bisection passes + 1 log-sum-exp pass, each re-reading the rows from HBM"}

    def draw_model(launch: Launch) -> dict[str, Any]:
        bm, bk = launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_K"]
        return {"trips": [math.ceil(K / bk)], "flops": 0.0, "hbm_bytes": nk * 2 + N * 36 + N * 128 * 2,
                "elements_per_iteration": bm * bk}

    ours = [_gemm("logits = h W^T (bf16)", N, K, D),
            *_triton_step("nucleus cut", lambda: sp.nucleus_cut_fwd(logits, 0.9), cut_model, arch),
            *_triton_step("posterior above the cut",
                          lambda: sp.sample_posterior_fwd(logits, zt, a, a, None, seed, 0, cut=cut), draw_model, arch)]
    ref = [_gemm("logits = h W^T (bf16 autocast)", N, K, D), _pass("log_softmax (fp32)", nk, 2 + 4),
           _pass("to float64", nk, 4 + 8), _pass("sort: 8 radix passes over float64 keys + int64 ids", nk, 8 * 32),
           _pass("softmax (float64)", nk, 16), _pass("cumsum", nk, 16), _pass("> top_p, shift", nk, 8 + 1 + 2),
           _pass("scatter the mask", nk, 1 + 8 + 1), _pass("masked fill", nk, 8 + 1 + 8), _pass("exp", nk, 16),
           _pass("sum, divide, log (renormalise)", nk, 3 * 16), _pass("exp", nk, 16),
           *_public_posterior_passes(nk)[3:]]
    floor = max(2.0 * N * K * D / H100["bf16_flops"], (N * D * 2 + K * D * 2) / H100["hbm_bytes_per_s"]) * 1e3
    return {"op": "posterior step + projection, nucleus 0.9", "dtype": "bf16", "N": N, "ours": ours, "reference": ref,
            "floor_ms": floor}


def _public_posterior_passes(nk: float) -> list[dict[str, Any]]:
    """The public sampler on materialised logits (bf16): log-softmax (fp32), exp, float64 posterior
    (section 2 written elementwise), float64 Gumbel noise and argmax."""
    return [_pass("log_softmax (fp32)", nk, 2 + 4), _pass("exp", nk, 4 + 4), _pass("to float64", nk, 4 + 8),
            _pass("one_hot(z_t) int64", nk, 8), _pass("one_hot to float64", nk, 8 + 8),
            _pass("a_t K x", nk, 8 + 8), _pass("* one_hot", nk, 16 + 8), _pass("(a_ts - a_t) one_hot", nk, 8 + 8),
            _pass("+", nk, 16 + 8), _pass("(a_s - a_t) x", nk, 8 + 8), _pass("+", nk, 16 + 8),
            _pass("+ uniform part", nk, 8 + 8), _pass("/ normaliser", nk, 8 + 8),
            _pass("rand float64", nk, 8), _pass("+ 1e-10", nk, 8 + 8), _pass("log", nk, 8 + 8),
            _pass("1e-10 - ", nk, 8 + 8), _pass("q / gumbel", nk, 16 + 8), _pass("argmax", nk, 8)]


def _posterior_logits(arch: int) -> dict[str, Any]:
    import torch

    from duo_fast.kernels import sample_posterior as sp

    N, K = SHAPES["N_sample"], SHAPES["K"]
    logits = _meta(N, K, dtype=torch.bfloat16)
    zt, a = _meta(N, dtype=torch.int64), _meta(N, dtype=torch.float64)
    seed = _meta(1, dtype=torch.int64)

    def model(launch: Launch) -> dict[str, Any]:
        bm, bk = launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_K"]
        # + the second pass: each row re-reads the 128 logits of its chosen group
        return {"trips": [math.ceil(K / bk)], "flops": 0.0, "hbm_bytes": N * K * 2 + N * 32 + N * 128 * 2,
                "elements_per_iteration": bm * bk}

    steps = _triton_step("posterior from logits", lambda: sp.sample_posterior_fwd(logits, zt, a, a, None, seed, 0),
                         model, arch)
    return {"op": "posterior step from logits", "dtype": "bf16", "N": N, "ours": steps,
            "reference": _public_posterior_passes(N * K), "floor_ms": N * K * 2 / H100["hbm_bytes_per_s"] * 1e3}


def _rb_loss_linear(dtype_name: str, arch: int) -> dict[str, Any]:
    """``dtype_name``: the parameters'. The hidden state is bf16 under autocast and
    ``ops.rb_loss_linear`` casts the weight to it, so the kernels and GEMMs run in bf16 either way;
    fp32 parameters add the weight cast."""
    import torch

    from duo_fast.kernels import gemm
    from duo_fast.kernels import rb_loss as rb

    N, K, D = SHAPES["N_train"], SHAPES["K"], SHAPES["D"]
    dt, es = torch.bfloat16, 2
    full = max(128, (256 << 20) // (K * es) // 128 * 128)    # duo_fast.ops.rb_loss.default_chunk_tokens on GPU
    K_pad = rb.padded_vocab(K)                                # the logits/gradient chunks' columns
    # the chunks of N tokens: each distinct size is compiled and estimated, then counted
    sizes = {full: N // full, **({N % full: 1} if N % full else {})}
    rem_share = 1.0 / (K + 1)        # P(a <= 1/(K + 1)) for a uniform in (0, 1): the blocks that need rem

    def stats_weights(loops: list[dict[str, Any]]) -> list[float]:
        """The first loop is the log-sum-exp pass; of the two second-pass loops (one per branch),
        the larger is the one with the rem term (run by blocks with a row whose beta <= 1)."""
        if len(loops) != 3:
            return [1.0] * len(loops)
        rem = 1 if loops[1]["instructions"] >= loops[2]["instructions"] else 2
        return [1.0] + [rem_share if i == rem else 1.0 - rem_share for i in (1, 2)]

    W, bias = _meta(K, D, dtype=dt), _meta(K, dtype=dt)
    steps = [_pass("weight cast fp32 -> bf16", K * D, 4 + 2)] if dtype_name == "fp32" else []
    def chunk_steps(chunk: int, count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(forward steps, backward steps) of ``count`` chunks of ``chunk`` tokens."""
        forward, backward = [], []
        logits = _meta(chunk, K_pad, dtype=dt)
        zt = _meta(chunk, dtype=torch.int64)
        beta = _meta(chunk, dtype=torch.float32)
        stats, coefs = _meta(9, chunk, dtype=torch.float32), _meta(5, chunk, dtype=torch.float32)
        hc, dw = _meta(chunk, D, dtype=dt), _meta(K, D, dtype=torch.float32)
        tag = f"{chunk}-token chunk"

        def stats_model(launch: Launch, chunk: int = chunk) -> dict[str, Any]:
            bm, bk = launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_K"]
            resident = H100["sms"] * 2 * bm * K_pad * es             # rows of the programs in flight (2 CTAs/SM)
            passes = 1 if resident <= H100["l2_bytes"] / 2 else 2
            return {"trips": [math.ceil(K_pad / bk)], "flops": 0.0, "hbm_bytes": passes * chunk * K_pad * es,
                    "elements_per_iteration": bm * bk, "loop_weights": stats_weights,
                    "assumption": f"two passes over each row; the second from L2 ({resident / 2**20:.0f} MB of rows "
                                  f"in flight), so {passes} from HBM; of the two second-pass loops only one runs per "
                                  f"block: the one with the beta <= 1 term in a share 1/(K + 1) of the blocks"}

        def linear_model(launch: Launch, chunk: int = chunk) -> dict[str, Any]:
            """The logits kernel and the fused logits + gradient kernel: a GEMM over D per tile; the
            row blocks of a vocabulary tile run side by side, so W is read from HBM once per chunk and
            the chunk's h (4 MB) stays in L2; the chunk's logits (or gradient) are written once."""
            bm, bk, bd = launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_K"], launch.kwargs["BLOCK_D"]
            return {"trips": [math.ceil(D / bd)], "flops": 2.0 * chunk * K_pad * D, "has_dot": True,
                    "hbm_bytes": chunk * D * es + K_pad * D * es + chunk * K_pad * es, "elements_per_iteration": bm * bk}

        def dw_model(launch: Launch, chunk: int = chunk) -> dict[str, Any]:
            bm, bn, bk = launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_N"], launch.kwargs["BLOCK_K"]
            return {"trips": [math.ceil(chunk / bk)], "flops": 2.0 * K_pad * D * chunk, "has_dot": True,
                    "hbm_bytes": chunk * K_pad * es + chunk * D * es + 2 * K * D * 4, "elements_per_iteration": bm * bn}

        for s in _triton_step(f"forward logits, h W^T + b in bf16 ({tag})",
                              lambda: rb.rb_logits_linear(hc, W, bias, out=logits), linear_model, arch):
            forward.append(_scale(s, count))
        for s in _triton_step(f"RB stats ({tag})", lambda: rb.rb_stats(logits, zt, zt, beta), stats_model, arch):
            forward.append(_scale(s, count))
        for s in _triton_step(f"backward: logits recomputed in registers + gradient ({tag})",
                              lambda: rb.rb_grad_linear(hc, W, bias, zt, zt, beta, stats, coefs, out=logits),
                              linear_model, arch):
            backward.append(_scale(s, count))
        for s in _triton_step(f"dW += dlogits^T h, fp32 ({tag})", lambda: gemm.matmul(logits.t(), hc, dw, True),
                              dw_model, arch):
            backward.append(_scale(s, count))
        return forward, backward

    backward = []
    for chunk, count in sizes.items():
        fwd, bwd = chunk_steps(chunk, count)
        steps += fwd
        backward += bwd
    steps += backward + [_gemm("dh = dlogits W", N, D, K, es, es)]
    # the GEMM floor of the fused design: forward logits, their recomputation, dh and dW
    floor = 4 * 2.0 * N * K * D / H100["bf16_flops"] * 1e3
    nk = N * K
    ref = [_gemm("logits (bf16 autocast)", N, K, D), _pass("log_softmax (fp32)", nk, 2 + 4), _pass("exp", nk, 8),
           _pass("K a x + 1 - a", nk, 8 + 8), _pass("log", nk, 8), _pass("sum", nk, 4),
           # autograd: log, the affine map, exp, log_softmax backwards, each materialised
           _pass("d log", nk, 12), _pass("d affine", nk, 8), _pass("d exp", nk, 12), _pass("d log_softmax", nk, 12),
           _pass("grad to bf16", nk, 6),
           _gemm("dh = dlogits W", N, D, K), _gemm("dW = dlogits^T h", K, D, N)]
    return {"op": "RB loss + projection (fwd+bwd)", "dtype": dtype_name, "N": N, "ours": steps, "reference": ref,
            "floor_ms": floor}


def _scale(step: dict[str, Any], n: int) -> dict[str, Any]:
    s = dict(step)
    for k in ("estimate_ms", "issue_ms", "hbm_ms", "tensor_ms", "mufu_ms", "flops", "hbm_bytes", "warp_instructions"):
        if k in s:
            s[k] = s[k] * n
    if n != 1:
        s["step"] = f"{s['step']} (x{n})"
    return s


def _relaxed(dtype_name: str, sparse: bool, arch: int) -> dict[str, Any]:
    """The dense and sparse relaxation: the RNG-only statistics pass, then per chunk of tokens the
    weights kernel (writes P, bf16 whatever the parameters' dtype) and the tensor-core GEMM; the
    backward regenerates P per chunk and accumulates ``P^T dh`` in fp32."""
    import torch

    from duo_fast.kernels import relaxed_embedding as re_k

    N, K, D = SHAPES["N_train"], SHAPES["K"], SHAPES["D"]
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    es = torch.finfo(dt).bits // 8
    x0 = _meta(N, dtype=torch.int64)
    at, st = _meta(N, dtype=torch.float32), _meta(N, dtype=torch.float32)
    E = _meta(K, D, dtype=dt)
    norm = _meta(2, N, dtype=torch.float32)
    dh = _meta(N, D, dtype=dt)
    seed = 2**61 + 12345                                    # a 62-bit seed, as the trainer draws them
    skip = 1.0 - 1e-3 if sparse else 0.0
    p_bytes = 2                                             # P is bf16 (tensor cores) for either parameter dtype

    def model(launch: Launch) -> dict[str, Any]:
        c = launch.kwargs
        if launch.kernel == "_re_stats_kernel":
            bm, bk = c["BLOCK_M"], c["BLOCK_K"]
            return {"trips": [math.ceil(K / bk)], "flops": 0.0, "hbm_bytes": N * 24, "elements_per_iteration": bm * bk}
        if launch.kernel == "_re_probs_kernel":
            tiles = math.prod(launch.grid)
            elems = tiles * c["BLOCK_M"] * c["BLOCK_K"]
            return {"trips": [1], "flops": 0.0, "hbm_bytes": elems * p_bytes + tiles * c["BLOCK_M"] * 24}
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        m, n_out, k_steps = launch.args[14], launch.args[15], launch.args[16]
        a_bytes = m * k_steps * p_bytes                     # the column tiles of a row block share it through L2
        if launch.args[18] == K:                            # forward: b = E (b_rows = K), re-read once per wave
            waves = math.ceil(math.prod(launch.grid) / H100["sms"])
            b_bytes, c_bytes = K * D * p_bytes * waves, m * n_out * es
        else:                                               # backward: b = dh of the chunk (in L2), c = dE fp32 (+=)
            b_bytes, c_bytes = k_steps * D * p_bytes, 2 * m * n_out * 4
        return {"trips": [math.ceil(k_steps / bk)], "flops": 2.0 * m * n_out * k_steps * (1 - skip),
                "hbm_bytes": a_bytes * (1 - skip) + b_bytes + c_bytes, "has_dot": True,
                "elements_per_iteration": bm * bn, "skip_fraction": skip,
                "assumption": "sparse: all but 0.1% of tiles skipped (tau = 1e-3)" if sparse else None}

    steps = [_pass("embedding fp32 -> bf16", K * D, 4 + 2)] if es == 4 else []
    steps += _triton_step("relaxed forward", lambda: re_k.relaxed_fwd(x0, at, st, E, 1e-3, seed, sparse), model, arch)
    steps += [_pass("dh fp32 -> bf16", N * D, 4 + 2)] if es == 4 else []
    steps += _triton_step("relaxed backward",
                          lambda: re_k.relaxed_bwd(x0, at, st, norm, dh, K, 1e-3, seed, sparse), model, arch)
    nk = N * K
    # the exact dense relaxation's floor: its two GEMMs (P @ E, P^T dh) at the bf16 peak
    floor = 2 * 2.0 * N * K * D / H100["bf16_flops"]
    # The public curriculum: its trainer runs the denoiser under autocast(dtype=float32) and the DiT
    # enters bf16 autocast only after the embedding, whose einsum takes softmax(...).float() and
    # embedding.float(): a float32 GEMM (TF32 is off by default), forward and backward.
    ref = [_pass("one_hot(x0) int64", nk, 8), _pass("randn fp32", nk, 4), _pass("at * one_hot", nk, 8 + 4),
           _pass("st * eps", nk, 4 + 4), _pass("+", nk, 8 + 4), _pass("* 1/tau", nk, 4 + 4), _pass("argmax", nk, 4),
           _pass("softmax (fp32)", nk, 4 + 4), _pass("embedding .float()", K * D, es + 4),
           _gemm("P @ E (fp32 einsum)", N, D, K, 4, 4, "fp32_flops"),
           _gemm("dE = P^T dh (fp32)", K, D, N, 4, 4, "fp32_flops")]
    return {"op": f"curriculum relaxation fwd+bwd ({'sparse' if sparse else 'dense'})", "dtype": dtype_name, "N": N,
            "ours": steps, "reference": ref, "floor_ms": floor * 1e3}


def _adaptive_iterations(N: int, K: int, tau: float, block: int, k_max: int) -> dict[str, float]:
    """Loop iterations of the adaptive kernel per program (the largest k among its tokens) and
    the mean k, from a draw of the PyTorch path at the OWT recipe (gamma uniform per sequence
    over [-3.55, -1.85], tau = 1e-3): a sample, not an assumption."""
    import torch

    from duo_fast.ops.relaxed_torch import adaptive_topk_relaxation

    g = torch.Generator().manual_seed(0)
    L = SHAPES["L"]
    gamma = (-3.55 + 1.7 * torch.rand(N // L, generator=g, dtype=torch.float64))[:, None].expand(N // L, L).reshape(-1)
    x0 = torch.randint(0, K, (N,), generator=g)
    out = adaptive_topk_relaxation(x0, gamma, tau, K, 1e-6, k_max, generator=g, early_exit=True)
    k = out["k"].double()
    return {"iterations": float(k.view(-1, block).amax(1).mean()), "k_mean": float(k.mean()),
            "k_max": float(k.max()), "bound_max": float(out["bound"].max())}


def _relaxed_adaptive(dtype_name: str, arch: int) -> dict[str, Any]:
    """The adaptive exact top-k relaxation (the training default at the recipes' tau): the Triton
    draw kernel, then PyTorch's embedding bag (forward gather, backward sort + scatter-add),
    whose CUDA kernels are not compiled here and are estimated from their memory traffic."""
    import torch

    from duo_fast.kernels import relaxed_topk as rt

    N, K, D = SHAPES["N_train"], SHAPES["K"], SHAPES["D"]
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    es = torch.finfo(dt).bits // 8
    tau = 1e-3
    from duo_fast.ops.relaxed import resolve_mode

    mode, k_max = resolve_mode("auto", tau, K, -1.85)            # the trainer's choice at the OWT recipe
    assert mode == "adaptive"
    kc = rt.kmax_constexpr(k_max)
    cols = kc + 1
    it = _adaptive_iterations(N, K, tau, rt.block_tokens(kc), k_max)
    x0, at = _meta(N, dtype=torch.int64), _meta(N, dtype=torch.float32)

    def model(launch: Launch) -> dict[str, Any]:
        return {"trips": [it["iterations"], 0], "flops": 0.0,
                "hbm_bytes": N * (8 + 4 + 4) + N * cols * (8 + 4 + 4) + N * (8 + 8 + 4),
                "assumption": f"loop iterations per program {it['iterations']:.2f} (max k of its tokens; mean k "
                              f"{it['k_mean']:.2f}, largest {it['k_max']:.0f}, drawn at the OWT recipe); id "
                              f"redraws (probability <= k/K) not counted"}

    steps = _triton_step("adaptive draw", lambda: rt.adaptive_topk(x0, at, at, K, tau, 1e-6, k_max, 2**61 + 7),
                         model, arch)
    rows = N * cols
    steps += [
        _pass("embedding_bag forward: gather rows, weights, write h0 (traffic)", 1,
              rows * (D * es + 8 + es) + N * D * es),
        _pass("embedding_bag backward: sort ids (4 radix passes, traffic)", rows, 4 * 2 * 16),
        _pass("embedding_bag backward: zero dE, read dh per entry, accumulate, write dE (traffic)", 1,
              2 * K * D * es + rows * (D * es + 4) + K * D * es),
    ]
    # the unavoidable traffic of any relaxation: h0 written, dh read, dE written
    floor = (2 * N * D * es + K * D * es) / H100["hbm_bytes_per_s"] * 1e3
    ref_op = _relaxed(dtype_name, True, arch)["reference"]
    return {"op": "curriculum relaxation fwd+bwd (adaptive)", "dtype": dtype_name, "N": N, "ours": steps,
            "reference": ref_op, "floor_ms": floor, "adaptive_draw": it}


def op_reports(arch: int = 90, only: str | None = None) -> list[dict[str, Any]]:
    """Every operator at the small preset's GPU shapes, bf16 and fp32 parameters."""
    builders: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("sample_posterior", lambda: _posterior_linear("bf16", arch)),
        ("sample_posterior", lambda: _posterior_linear("fp32", arch)),
        ("sample_posterior", lambda: _posterior_logits(arch)),
        ("sample_posterior", lambda: _posterior_linear("bf16", arch, psi=True)),
        ("sample_posterior", lambda: _posterior_nucleus(arch)),
        ("rb_loss", lambda: _rb_loss_linear("bf16", arch)),
        ("rb_loss", lambda: _rb_loss_linear("fp32", arch)),
        ("relaxed_embedding", lambda: _relaxed("bf16", False, arch)),
        ("relaxed_embedding", lambda: _relaxed("bf16", True, arch)),
        ("relaxed_embedding", lambda: _relaxed("fp32", False, arch)),
        ("relaxed_embedding", lambda: _relaxed("fp32", True, arch)),
        ("relaxed_topk", lambda: _relaxed_adaptive("bf16", arch)),
        ("relaxed_topk", lambda: _relaxed_adaptive("fp32", arch)),
    ]
    out = []
    for module, build in builders:
        if only and only not in module:
            continue
        r = build()
        r["module"] = module
        r["ours_ms"] = sum(s["estimate_ms"] for s in r["ours"])
        r["reference_ms"] = sum(s["estimate_ms"] for s in r["reference"])
        r["vs_floor"] = r["ours_ms"] / r["floor_ms"]
        r["vs_reference"] = r["ours_ms"] / r["reference_ms"]
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# 5. Whole steps of the small model
# ---------------------------------------------------------------------------------------------

def whole_step(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training micro-steps (curriculum, discrete) and a sampling step of the small model, ours
    and reference style, from the operator reports (bf16)."""
    from duo_fast.model.config import DiTConfig

    L, K, D = SHAPES["L"], SHAPES["K"], SHAPES["D"]
    cfg = DiTConfig.from_name("small", vocab_size=K, model_length=L)
    body_fwd = cfg.forward_flops_per_token(L) - 2.0 * D * K          # the output projection is in the operators
    gemm_rate = H100["bf16_flops"] * H100["gemm_efficiency"]
    by = {(o["op"], o["dtype"]): o for o in ops}
    rows = []

    def add(name: str, n: int, passes: int, parts: list[str]) -> None:
        dit_ms = passes * body_fwd * n / gemm_rate * 1e3
        missing = [p for p in parts if (p, "bf16") not in by]
        if missing:
            return
        ours = dit_ms + sum(by[(p, "bf16")]["ours_ms"] for p in parts)
        ref = dit_ms + sum(by[(p, "bf16")]["reference_ms"] for p in parts)
        model_flops = (3.0 if passes == 3 else 1.0) * cfg.forward_flops_per_token(L) * n
        for who, key, ms in (("ours", "ours_ms", ours), ("reference style", "reference_ms", ref)):
            shares = {"denoiser": dit_ms / ms, **{p: by[(p, "bf16")][key] / ms for p in parts}}
            rows.append({"step": name, "path": who, "tokens": n, "estimate_ms": ms, "tokens_per_s": n / ms * 1e3,
                         "mfu": model_flops / (ms / 1e3) / H100["bf16_flops"], "shares": shares})

    n_train, n_sample = SHAPES["N_train"], SHAPES["N_sample"]
    add("training micro-step, curriculum", n_train, 3,                 # the default relaxation (auto: adaptive)
        ["curriculum relaxation fwd+bwd (adaptive)", "RB loss + projection (fwd+bwd)"])
    add("training micro-step, curriculum (sparse relaxation)", n_train, 3,
        ["curriculum relaxation fwd+bwd (sparse)", "RB loss + projection (fwd+bwd)"])
    add("training micro-step, discrete", n_train, 3, ["RB loss + projection (fwd+bwd)"])
    add("sampling step", n_sample, 1, ["posterior step + projection"])
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def report(arch: int = 90, only: str | None = None) -> dict[str, Any]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the cost model compiles real kernels: run it without TRITON_INTERPRET=1")
    ops = op_reports(arch, only)
    return {"label": "STATIC ESTIMATES for an H100 SXM from compiled SASS; not measurements",
            "constants": H100, "constant_notes": H100_NOTES, "shapes": SHAPES, "arch": f"sm_{arch}a",
            "ops": ops, "whole_step": whole_step(ops) if only is None else []}


def print_report(r: dict[str, Any]) -> None:
    print(r["label"])
    print("constants: " + ", ".join(f"{k}={v:g}" for k, v in r["constants"].items()))
    print(f"{'operator':48s} {'dtype':5s} {'ours ms':>9s} {'floor ms':>9s} {'x floor':>8s} {'ref ms':>9s} {'x ref':>7s}")
    for o in r["ops"]:
        print(f"{o['op']:48s} {o['dtype']:5s} {o['ours_ms']:9.2f} {o['floor_ms']:9.2f} {o['vs_floor']:8.2f} "
              f"{o['reference_ms']:9.2f} {o['vs_reference']:7.2f}")
        for s in o["ours"]:
            if s["kind"] == "triton":
                loops = "; ".join(f"d{lp['depth']}:{lp['instructions']}i/{lp['spills']}sp/{lp['tensor_core']}tc"
                                  for lp in s["loops"] if lp["instructions"] > 32)
                ipe = s["instructions_per_element"]
                print(f"    {s['kernel']:34s} {s['estimate_ms']:8.2f} ms ({s['bound']}-bound) regs {s['registers']} "
                      f"stack {s['stack_bytes']} smem {s['shared_bytes']} warps/SM {s['warps_per_sm']} "
                      f"tc {','.join(s['tensor_core_ops']) or '-'} hot spills {s['hot_loop_spills']} "
                      f"instr/elem {ipe:.1f} loops [{loops}]" if ipe else
                      f"    {s['kernel']:34s} {s['estimate_ms']:8.2f} ms ({s['bound']}-bound) regs {s['registers']}")
            else:
                print(f"    {s['step']:34s} {s['estimate_ms']:8.2f} ms ({s['kind']})")
    if r["whole_step"]:
        print(f"\n{'whole step (small model)':36s} {'path':16s} {'ms':>8s} {'tokens/s':>12s} {'MFU':>6s}  shares")
        for w in r["whole_step"]:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in w["shares"].items())
            print(f"{w['step']:36s} {w['path']:16s} {w['estimate_ms']:8.2f} {w['tokens_per_s']:12,.0f} "
                  f"{w['mfu']:6.1%}  {shares}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="only the kernel modules whose name contains this")
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90: Hopper, compiled as sm_90a)")
    ap.add_argument("--json", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    r = report(args.arch, args.only)
    print_report(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
