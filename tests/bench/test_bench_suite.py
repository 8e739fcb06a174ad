"""`duo-fast bench kernels --preset tiny --repeats 1`: every case runs both paths, the JSON has
the documented schema, and the reference and ours agree on the benchmarked inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROW_KEYS = {"group", "case", "ref_ms", "ours_ms", "speedup", "ref_peak_mb", "ours_peak_mb", "mem_ratio", "match",
            "check", "flops", "bytes", "counted", "ours_tflops", "ours_gbs"}


def test_bench_kernels_tiny_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # as a user runs it on a CPU
    proc = subprocess.run([sys.executable, "-m", "duo_fast.cli", "bench", "kernels", "--preset", "tiny", "--repeats",
                           "1", "--min-seconds", "0", "--json", str(out), "--no-progress"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert {"bench", "groups", "preset", "shape", "env", "backend", "rows", "all_match", "seconds"} <= set(res)
    assert res["groups"] == ["kernels"] and res["preset"] == "tiny" and res["all_match"] is True
    names = [r["case"] for r in res["rows"]]
    for expected in ("T lookup", "rb_loss fwd+bwd", "rb_loss_linear", "relaxed_embedding dense",
                     "relaxed_embedding sparse", "relaxed_embedding topk", "sample_posterior step",
                     "projection + sample_posterior"):
        assert any(n.startswith(expected) for n in names), f"missing case {expected}"
    for r in res["rows"]:
        assert ROW_KEYS <= set(r), f"{r['case']}: missing {ROW_KEYS - set(r)}"
        assert r["match"] is True and r["check"]["ok"] is True
        assert r["ref_ms"] > 0 and r["ours_ms"] > 0 and abs(r["speedup"] - r["ref_ms"] / r["ours_ms"]) < 1e-9
        assert r["flops"] > 0 or r["bytes"] > 0, "every case states the work it counts"
    # the printed table carries the same numbers as the JSON
    first = res["rows"][0]
    assert f"{first['ref_ms']:.2f}" in proc.stdout and f"{first['ours_ms']:.2f}" in proc.stdout


def test_gpu_check_dry_run_lists_steps_and_checks_prerequisites():
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "prerequisites" in out and "torch" in out and "triton" in out
    for step in ("build_ext", "compile", "kernel_tests", "bench_suite", "bench_rb_loss", "bench_relaxed",
                 "bench_sample"):
        assert f"  {step}" in out, f"step {step} not listed"
    # on a machine without a GPU the dry run says that the real run would stop, and why
    import torch

    if not torch.cuda.is_available():
        assert "would stop: missing cuda" in out
