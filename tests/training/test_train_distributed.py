"""DeepSpeed ZeRO training under torchrun (2 CPU processes, gloo): curriculum then discrete,
ranks on different data, exact resume after SIGTERM, no half-written checkpoint after a crash
mid-save, and configuration errors before any training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duo_fast.cli import main

pytestmark = pytest.mark.slow

deepspeed = pytest.importorskip("deepspeed")

BASE = ["--device", "cpu", "--model", "tiny", "--tokenizer", "bundled", "--tokenizer-vocab", "512", "--length", "32",
        "--batch-size",
        "8", "--lr", "2e-3", "--warmup-steps", "5", "--ema", "0", "--dropout", "0", "--val-batches", "1",
        "--log-every", "1", "--no-progress", "--gamma-min", "-3.5", "--gamma-max", "-1.75",
        "--tau-log10-start", "-1", "--tau-log10-end", "-2"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(args: list[str], nproc: int = 2, env: dict[str, str] | None = None,
              command: str = "train") -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", _port(),
           "-m", "duo_fast.cli", command, *(BASE if command == "train" else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=900)


def _log(out: Path) -> list[dict]:
    """The step records of a run's log (resume markers left out)."""
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "export" / "model.safetensors"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_two_ranks(tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    ema = ["--ema", "0.9"] if stage == 3 else []          # the EMA under ZeRO-3 gathers the partitioned weights
    proc = _torchrun(["--zero-stage", str(stage), "--steps", "30", "--curriculum-end", "15", "--out", str(out), *ema])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = _log(out)
    assert [r["step"] for r in log] == list(range(30))
    assert {r["phase"] for r in log[:15]} == {"curriculum"} and {r["phase"] for r in log[15:]} == {"discrete"}
    assert torch.isfinite(torch.tensor([r["loss"] for r in log])).all()
    for r in log:                                     # the two ranks read different blocks every step
        assert len(r["batch_checksums"]) == 2 and r["batch_checksums"][0] != r["batch_checksums"][1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage
    # the two phases train different objectives; the fixed-seed validation NELBO compares
    assert summary["val_nelbo_end"] < summary["val_nelbo_start"], summary
    assert (out / "export" / "model.safetensors").exists()


def test_sigterm_resume_matches_uninterrupted_and_crash_mid_save_is_harmless(tmp_path):
    common = ["--zero-stage", "2", "--steps", "24", "--curriculum-end", "10"]
    full = tmp_path / "full"
    proc = _torchrun([*common, "--out", str(full)])
    assert proc.returncode == 0, proc.stderr[-5000:]

    # SIGTERM to rank 1 only, after step 12: the ranks agree to stop at that step, one complete
    # checkpoint, a non-zero exit within a minute; then the same command finishes the run
    import time

    cut = tmp_path / "cut"
    t0 = time.monotonic()
    proc = _torchrun([*common, "--out", str(cut)],
                     env={"DUO_FAST_TEST_SIGNAL_AT_STEP": "12", "DUO_FAST_TEST_SIGNAL_RANK": "1"})
    assert proc.returncode != 0 and time.monotonic() - t0 < 300
    assert "signal" in proc.stdout and "at step 12" in proc.stdout, proc.stdout[-2000:]
    done = sorted(p.name for p in (cut / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert done == ["step000000012"], done
    proc = _torchrun([*common, "--out", str(cut)])
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert [r["step"] for r in _log(cut)] == list(range(24))
    a, b = _weights(full), _weights(cut)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst:.2e}"

    # a crash in the middle of writing the step-11 checkpoint: the step-7 one stays the newest complete
    crash = tmp_path / "crash"
    proc = _torchrun([*common, "--save-every", "4", "--out", str(crash)], env={"DUO_FAST_TEST_DIE_IN_SAVE": "11"})
    assert proc.returncode != 0
    from duo_fast.training.duo import latest_checkpoint

    ckpts = crash / "checkpoints"
    assert latest_checkpoint(ckpts) == ckpts / "step000000007"
    assert (ckpts / ".tmp-step000000011").exists() and not (ckpts / "step000000011").exists()
    proc = _torchrun([*common, "--save-every", "4", "--out", str(crash)])
    assert proc.returncode == 0, proc.stderr[-5000:]
    c = _weights(crash)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) <= 1e-6


def test_configuration_errors_before_training(tmp_path):
    with pytest.raises(SystemExit, match="not a multiple of micro_batch_size"):
        main(["train", *BASE, "--micro-batch-size", "3", "--steps", "2", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", *BASE, "--dataset", f"text:{tmp_path / 'missing.txt'}", "--steps", "2",
              "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--zero-stage: invalid choice: 5"):
        main(["train", *BASE, "--zero-stage", "5", "--steps", "2"])
    assert not (tmp_path / "a" / "log.jsonl").exists() and not (tmp_path / "b" / "log.jsonl").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_distill_two_ranks(tmp_path, stage):
    """DCD under torchrun: rounds refresh the teacher, dt doubles, the export samples. ZeRO-3 with
    no EMA validates and exports the partitioned student itself (gathered into a fresh module,
    never a deep copy of the engine's), and samples at a validation."""
    trained = tmp_path / "trained"
    proc = _torchrun(["--zero-stage", "2", "--steps", "4", "--curriculum-end", "2", "--out", str(trained)])
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "dcd"
    ema = ["--ema", "0.9"] if stage == 2 else ["--ema", "0", "--val-every", "6", "--val-samples", "1",
                                               "--val-sample-steps", "2"]
    proc = _torchrun(["--checkpoint", str(trained / "export"), "--dataset", "bundled", "--zero-stage", str(stage),
                      "--device", "cpu", "--batch-size", "8", "--steps", "12", "--update-every", "4", "--t-grid", "8",
                      *ema, "--no-progress", "--out", str(out)], command="distill")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = _log(out)
    assert [r["step"] for r in log if r["teacher_refreshed"]] == [4, 8]
    assert {r["round"]: r["dt"] for r in log} == {0: 0.125, 1: 0.25, 2: 0.5}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage
    if stage == 3:
        assert [v["step"] for v in summary["validations"]] == [5, 11]
        assert all("sample_entropy" in v for v in summary["validations"])
    samples = tmp_path / "s.jsonl"
    assert main(["sample", "--checkpoint", str(out / "export"), "--steps", "4", "--batch", "2", "--num-samples", "2",
                 "--out", str(samples), "--no-progress"]) == 0


def test_zero3_training_without_ema_validates_and_samples(tmp_path):
    """ZeRO-3 with --ema 0: validation, its samples and the export read the partitioned weights
    through a gathered copy (a deep copy of the engine's module crashed here)."""
    out = tmp_path / "z3"
    proc = _torchrun(["--zero-stage", "3", "--steps", "6", "--curriculum-end", "2", "--val-every", "3",
                      "--val-samples", "1", "--val-sample-steps", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [v["step"] for v in summary["validations"]] == [2, 5]
    assert all("sample_entropy" in v for v in summary["validations"])
    assert (out / "best" / "model.safetensors").exists() and (out / "export" / "model.safetensors").exists()


def test_zero2_two_ranks_follow_the_single_process_trajectory(tmp_path):
    """The noise and dropout of each micro-batch come from (seed, step, slot) and rank r reads the
    r-th slice of each global micro-batch, so 2 ranks x 1 micro-batch under ZeRO-2 and 1 process x
    2 accumulated micro-batches compute the same steps: the loss trajectory agrees within 1e-5
    relative (fp32; only the order of the gradient sums differs), and the EMA exported from
    ZeRO-2's float32 weights equals the single-process EMA within 5e-5 (with the public EMA
    warm-up the average follows the latest weights, which carry those fp32 rounding differences
    of 8 updates)."""
    common = ["--steps", "8", "--curriculum-end", "4", "--ema", "0.9", "--dropout", "0.1"]
    one = tmp_path / "one"
    proc = _torchrun([*common, "--zero-stage", "0", "--micro-batch-size", "4", "--out", str(one)], nproc=1)
    assert proc.returncode == 0, proc.stderr[-5000:]
    two = tmp_path / "two"
    proc = _torchrun([*common, "--zero-stage", "2", "--out", str(two)])
    assert proc.returncode == 0, proc.stderr[-5000:]
    a, b = _log(one), _log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(8))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), (ra, rb)
        # the same blocks: micro-batch j of the one process is rank j's micro-batch
        assert ra["batch_checksums"][0] == [rb["batch_checksums"][0][0], rb["batch_checksums"][1][0]]
    wa, wb = _weights(one), _weights(two)
    assert all(v.dtype == torch.float32 for v in wb.values())
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 5e-5, f"EMA of the ZeRO-2 run differs from the single-process one by {worst:.2e}"


def test_deepspeed_config_keeps_float32_weights():
    """On CUDA as on CPU: no DeepSpeed bf16 mode (the denoiser autocasts its blocks), fused AdamW."""
    from duo_fast.training.engine import ds_config

    for dev in ("cpu", "cuda"):
        cfg = ds_config(2, 4, 2, 8, 3e-4, (0.9, 0.999), 0.0, 1.0, torch.device(dev))
        assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
        assert cfg["optimizer"]["params"]["fused"] is True and cfg["train_batch_size"] == 64


def test_zero12_without_clipping_skip_the_host_read_of_the_grad_norm():
    """ZeRO-1/2 read their gradient norm on the host each step when they compute it; with no
    clipping the config turns that computation off (a field DeepSpeed validates), with clipping not."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from duo_fast.training.engine import ds_config

    for stage in (1, 2):
        off = ds_config(stage, 4, 1, 2, 3e-4, (0.9, 0.999), 0.0, 0.0, torch.device("cpu"))["zero_optimization"]
        on = ds_config(stage, 4, 1, 2, 3e-4, (0.9, 0.999), 0.0, 1.0, torch.device("cpu"))["zero_optimization"]
        if "compute_grad_norm" not in getattr(DeepSpeedZeroConfig, "model_fields", {}):
            pytest.skip("this DeepSpeed has no zero_optimization.compute_grad_norm")
        assert off["compute_grad_norm"] is False and "compute_grad_norm" not in on
        assert DeepSpeedZeroConfig(**off).compute_grad_norm is False
    z3 = ds_config(3, 4, 1, 2, 3e-4, (0.9, 0.999), 0.0, 0.0, torch.device("cpu"))["zero_optimization"]
    assert "compute_grad_norm" not in z3                # ZeRO-3 has no such setting


def test_deepspeed_launcher_as_the_readme_shows_it(tmp_path):
    """`deepspeed --num_gpus 2 --module duo_fast.cli train ...` (CPU accelerator): the launcher's
    --local_rank is accepted, both ranks train and the run finishes."""
    import shutil

    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    out = tmp_path / "ds"
    cmd = [launcher, "--num_gpus", "2", "--master_port", _port(), "--module", "duo_fast.cli", "train", *BASE,
           "--zero-stage", "2", "--steps", "4", "--curriculum-end", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = _log(out)
    assert [r["step"] for r in log] == list(range(4)) and all(len(r["batch_checksums"]) == 2 for r in log)
