"""The static H100 cost model (duo_fast.tools.cost_model): it runs for every kernel module, its
figures are sane, the compile it reads is the one a JIT launch builds, and the invariants of the
production configurations hold: every bf16 dot on tensor cores, no register spills in hot loops
beyond the recorded ones (which may only shrink). Runs without TRITON_INTERPRET (real compiles)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Hot-loop spills (LDL + STL in the kernel's loops) known at the production configurations, by
# (operator, parameter dtype, kernel): none remain. A kernel may only be listed with a count that
# shrinks, and must leave the table when it reaches 0.
KNOWN_HOT_SPILLS: dict[tuple[str, str, str], int] = {}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("cost") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "duo_fast.tools.cost_model", "--json", str(path)],
                          capture_output=True, text=True, env=_env(), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "STATIC ESTIMATES" in proc.stdout
    return json.loads(path.read_text())


def test_every_module_and_sane_figures(report):
    assert {o["module"] for o in report["ops"]} == {"sample_posterior", "rb_loss", "relaxed_embedding", "relaxed_topk"}
    for o in report["ops"]:
        assert o["floor_ms"] > 0 and o["reference_ms"] > 0, o["op"]
        assert o["ours_ms"] >= 0.99 * o["floor_ms"], f"{o['op']}: an estimate below its own floor"
        for s in o["ours"]:
            assert s["estimate_ms"] >= 0 and s["hbm_bytes"] >= 0
            if s["kind"] == "triton":
                assert 0 < s["registers"] <= 255 and s["warps_per_sm"] > 0 and s["waves"] >= 1
                assert s["estimate_ms"] == pytest.approx(max(s["issue_ms"], s["hbm_ms"], s["tensor_ms"], s["mufu_ms"]))
                assert s["instructions_per_element"] is None or s["instructions_per_element"] > 0
    steps = {(w["step"], w["path"]) for w in report["whole_step"]}
    for name in ("training micro-step, curriculum", "training micro-step, discrete", "sampling step"):
        assert {(name, "ours"), (name, "reference style")} <= steps
    assert all(0 < w["mfu"] < 1 and w["tokens_per_s"] > 0 for w in report["whole_step"])
    assert report["constants"]["sms"] == 132 and report["constants"]["hbm_bytes_per_s"] == 3.35e12


def test_every_production_bf16_dot_is_on_tensor_cores(report):
    for o in report["ops"]:
        for s in o["ours"]:
            if s["kind"] == "triton" and s["has_dot"] and not s["config"].get("IEEE", False):
                assert any(op.startswith(("HGMMA", "HMMA")) and "BF16" in op for op in s["tensor_core_ops"]), \
                    f"{o['op']} {o['dtype']} {s['kernel']}: tl.dot without bf16 tensor-core instructions"


def test_hot_loop_spills_only_shrink(report):
    seen = {}
    for o in report["ops"]:
        for s in o["ours"]:
            if s["kind"] == "triton":
                seen[(o["op"], o["dtype"], s["kernel"])] = s["hot_loop_spills"]
    problems = []
    for key, n in seen.items():
        known = KNOWN_HOT_SPILLS.get(key, 0)
        if n > known:
            problems.append(f"{key}: {n} hot-loop spills (allowed {known})")
        if key in KNOWN_HOT_SPILLS and n == 0:
            problems.append(f"{key}: no spills any more: remove it from KNOWN_HOT_SPILLS")
    assert not problems, "\n".join(problems)


def test_the_compile_is_specialised_as_a_jit_launch():
    """For real tensors, the specialisation the cost model and compile_check derive from meta tensors
    of the same shapes (aligned pointers) equals the one Triton's binder gives for the real tensors."""
    code = r'''
import torch
from duo_fast.kernels import sample_posterior as sp, rb_loss as rb, relaxed_embedding as re_k
from duo_fast.tools import cost_model as cm
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

def spec(launch, real):
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    args = launch.args if real else [cm._PointerProbe(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    return binder(*args, **launch.kwargs)[1]

def both(make):
    real = cm.capture_launches(lambda: make("cpu"))
    meta = cm.capture_launches(lambda: make("meta"))
    assert len(real) == len(meta) > 0
    for r, m in zip(real, meta):
        assert spec(r, True) == spec(m, False), (r.kernel, spec(r, True), spec(m, False))
    return len(real)

def t(*s, dtype, dev): return torch.zeros(*s, dtype=dtype, device=dev)
n = 0
n += both(lambda d: sp.sample_posterior_fwd(t(48, 1000, dtype=torch.bfloat16, dev=d), t(48, dtype=torch.int64, dev=d),
          t(48, dtype=torch.float64, dev=d), t(48, dtype=torch.float64, dev=d), None, 12345, 0))
n += both(lambda d: sp.sample_posterior_linear_fwd(t(37, 64, dtype=torch.bfloat16, dev=d),
          t(1000, 64, dtype=torch.bfloat16, dev=d), None, t(37, dtype=torch.int64, dev=d),
          t(37, dtype=torch.float64, dev=d), t(37, dtype=torch.float64, dev=d), None, t(1, dtype=torch.int64, dev=d), 0))
n += both(lambda d: rb.rb_stats(t(40, 777, dtype=torch.float32, dev=d), t(40, dtype=torch.int64, dev=d),
          t(40, dtype=torch.int64, dev=d), t(40, dtype=torch.float32, dev=d)))
n += both(lambda d: re_k.relaxed_fwd(t(33, dtype=torch.int64, dev=d), t(33, dtype=torch.float32, dev=d),
          t(33, dtype=torch.float32, dev=d), t(300, 70, dtype=torch.bfloat16, dev=d), 1e-3, 2**61 + 5, True))
print("specialisations equal:", n)
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "specialisations equal: 6" in proc.stdout



def test_the_logits_kernel_does_not_specialise_on_the_row_stride():
    """Aligned rows (a stride that is a multiple of 8 bf16) would be vectorised, which lays the
    draw's interleaved groups across warps (kernels/sample_posterior.py): the compile must be the
    same whatever the stride."""
    code = r'''
import torch
from duo_fast.kernels import sample_posterior as sp
from duo_fast.kernels._common import meta
from duo_fast.tools import cost_model as cm

def key(stride):
    logits = meta(64, stride, dtype=torch.bfloat16)[:, :1000]
    zt, a = meta(64, dtype=torch.int64), meta(64, dtype=torch.float64)
    (launch,) = cm.capture_launches(lambda: sp.sample_posterior_fwd(logits, zt, a, a, None, 5, 0))
    return cm.specialization_key(launch)

print("same:", key(1000) == key(1001) == key(1024))
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same: True" in proc.stdout


def test_no_kernel_specialises_on_its_seed():
    """A seed divisible by 16 (or equal to 1) must not compile a new kernel mid-training: every
    launch that takes a Python int seed specialises alike for any seed."""
    code = r'''
import torch
from duo_fast.kernels import relaxed_embedding as re_k, relaxed_topk as rt, sample_posterior as sp
from duo_fast.kernels._common import meta
from duo_fast.tools import cost_model as cm

N, K, D = 100, 300, 64
x0, at = meta(N, dtype=torch.int64), meta(N, dtype=torch.float32)
logits, a = meta(N, K, dtype=torch.bfloat16), meta(N, dtype=torch.float64)
calls = {
    "adaptive": lambda seed: rt.adaptive_topk(x0, at, at, K, 1e-3, 1e-6, 8, seed),
    "relaxed": lambda seed: re_k.relaxed_fwd(x0, at, at, meta(K, D, dtype=torch.bfloat16), 1e-3, seed, False),
    "posterior": lambda seed: sp.sample_posterior_fwd(logits, x0, a, a, None, seed, 0),
}
for name, call in calls.items():
    keys = {tuple(cm.specialization_key(l) for l in cm.capture_launches(lambda: call(s)))
            for s in (2**61 + 7, 2**61 + 16, 1, 32)}
    print(name, "same:", len(keys) == 1)
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("same: True") == 3, proc.stdout
