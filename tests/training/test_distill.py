"""`duo-fast distill` (DCD, section 6): rounds refresh the teacher, dt doubles per round, the
loss is a KL (>= 0), and the exported model samples through `duo-fast sample`."""

from __future__ import annotations

import json

import pytest
import torch

from duo_fast.cli import main
from duo_fast.training.dcd import DistillConfig, dcd_gap, kl_divergence


def _teacher_checkpoint(tmp_path) -> str:
    """The export of a short `duo-fast train` run (bundled tokenizer named in its config.json)."""
    out = tmp_path / "trained"
    assert main(["train", "--model", "tiny", "--tokenizer", "bundled", "--tokenizer-vocab", "512", "--length", "32",
                 "--batch-size", "4", "--steps", "4", "--curriculum-end", "2", "--ema", "0", "--val-batches", "1",
                 "--no-progress", "--out", str(out)]) == 0
    return str(out / "export")


def test_dt_schedule():
    cfg = DistillConfig(checkpoint="x", update_every=5, t_grid=8)
    assert [dcd_gap(s, cfg) for s in (0, 4, 5, 10, 15, 100)] == [(0, 0.125), (0, 0.125), (1, 0.25), (2, 0.5),
                                                                  (3, 1.0), (20, 1.0)]
    # the public linear_growth_dt: dt_min + (step / steps)(dt_max - dt_min), whatever the round
    lin = DistillConfig(checkpoint="x", update_every=5, t_grid=8, dt_growth="linear", steps=100)
    assert dcd_gap(0, lin) == (0, 0.001)
    assert dcd_gap(12, lin) == (2, pytest.approx(0.001 + 0.12 * (0.25 - 0.001)))
    assert dcd_gap(100, lin)[1] == pytest.approx(0.25)


def test_kl_directions():
    a, b = torch.randn(3, 4, 11), torch.randn(3, 4, 11)
    assert torch.allclose(kl_divergence(a, a, "kl-bwd"), torch.zeros(3, 4), atol=1e-6)
    pa, pb = a.softmax(-1).double(), b.softmax(-1).double()
    assert torch.allclose(kl_divergence(a, b, "kl-bwd").double(), (pa * (pa.log() - pb.log())).sum(-1), atol=1e-5)
    assert torch.allclose(kl_divergence(a, b, "kl-fwd").double(), (pb * (pb.log() - pa.log())).sum(-1), atol=1e-5)


def test_distill_rounds_then_sample(tmp_path):
    ckpt = _teacher_checkpoint(tmp_path)
    out = tmp_path / "dcd"
    assert main(["distill", "--checkpoint", ckpt, "--dataset", "bundled", "--batch-size", "4", "--steps", "20",
                 "--update-every", "5", "--t-grid", "8", "--warmup-steps", "2", "--lr", "1e-4", "--ema", "0.9",
                 "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    log = [r for r in records if "loss" in r]
    assert [r["step"] for r in log] == list(range(20))
    assert [r["step"] for r in records if "val_nelbo" in r] == [19]          # validation at the end
    refreshed = [r["step"] for r in log if r["teacher_refreshed"]]
    assert refreshed == [5, 10, 15]
    dts = {r["round"]: r["dt"] for r in log}
    assert dts == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}          # dt doubles per round
    assert all(r["loss"] >= -1e-6 for r in log)
    samples = tmp_path / "s.jsonl"
    assert main(["sample", "--checkpoint", str(out / "export"), "--steps", "4", "--batch", "2", "--num-samples", "2",
                 "--out", str(samples), "--no-progress"]) == 0
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["token_ids"]) == 32 for r in rows)


def test_distill_config_errors(tmp_path):
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        main(["distill", "--dataset", "bundled"])
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"checkpoint": "x", "update_evry": 3}))
    with pytest.raises(SystemExit, match=r"unknown field\(s\)"):
        main(["distill", "--config", str(cfg)])
    with pytest.raises(SystemExit, match="missing.yaml: no such file"):
        main(["distill", "--config", str(tmp_path / "missing.yaml")])


def test_distill_resume_after_sigterm_is_exact(tmp_path, monkeypatch):
    """Single process (the plain engine): SIGTERM after step 5 of 12 writes a checkpoint and
    exits; the same command finishes with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    ckpt = _teacher_checkpoint(tmp_path)
    args = ["--checkpoint", ckpt, "--dataset", "bundled", "--batch-size", "4", "--steps", "12", "--update-every", "4",
            "--t-grid", "8", "--ema", "0.9", "--teacher-from", "ema", "--no-progress"]
    assert main(["distill", *args, "--out", str(tmp_path / "full")]) == 0
    monkeypatch.setenv("DUO_FAST_TEST_SIGNAL_AT_STEP", "5")
    with pytest.raises(SystemExit) as stopped:
        main(["distill", *args, "--out", str(tmp_path / "cut")])
    assert stopped.value.code == 143
    monkeypatch.delenv("DUO_FAST_TEST_SIGNAL_AT_STEP")
    assert main(["distill", *args, "--out", str(tmp_path / "cut")]) == 0
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "export" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    records = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(12))          # each step once
    assert [r["next_step"] for r in records if r.get("event") == "resume"] == [6]


def test_tokenizer_that_does_not_match_the_checkpoint_is_an_error(tmp_path):
    """A tokenizer folder of another vocabulary than the checkpoint's: a clear error before distilling."""
    from duo_fast.data import cache_root, get_tokenizer

    ckpt = _teacher_checkpoint(tmp_path)
    get_tokenizer("bundled", 256)                                    # trained and cached as a folder
    other = cache_root() / "tokenizers" / "jargon-bpe-256"
    with pytest.raises(SystemExit, match="do not belong together"):
        main(["distill", "--checkpoint", ckpt, "--tokenizer", str(other), "--dataset", "bundled", "--steps", "2",
              "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x" / "log.jsonl").exists()


def test_train_and_distill_share_one_run_config():
    """The fields both commands have are declared once (RunConfig), with their checks: distill
    honours --val-fraction and refuses a bad one exactly as train does."""
    import dataclasses

    from duo_fast.training.config import RunConfig
    from duo_fast.training.duo import TrainConfig

    common = {f.name for f in dataclasses.fields(RunConfig)}
    assert common <= {f.name for f in dataclasses.fields(DistillConfig)}
    assert common <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert "val_fraction" in common and DistillConfig(checkpoint="x", val_fraction=0.2).val_fraction == 0.2
    for cls, extra in ((TrainConfig, {}), (DistillConfig, {"checkpoint": "x"})):
        with pytest.raises(ValueError, match="--val-fraction"):
            cls(val_fraction=0.7, **extra)
    # the help and choices of a shared field come from RunConfig, whatever the recipe's default
    help_of = {cls: {f.name: f.metadata["help"] for f in dataclasses.fields(cls)} for cls in (TrainConfig, DistillConfig)}
    assert help_of[TrainConfig]["zero_stage"] == help_of[DistillConfig]["zero_stage"]


def test_distill_holds_out_the_val_fraction_of_a_local_file(tmp_path):
    """A text:PATH data set: distill's validation blocks are the --val-fraction held out, the same
    documents train holds out (one data path for both)."""
    from duo_fast.training.dcd import Distiller
    from duo_fast.training.duo import TrainConfig, Trainer

    ckpt = _teacher_checkpoint(tmp_path)
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"document number {i} with a few words in it, said plainly.\n" for i in range(400)))
    data = dict(dataset=f"text:{docs}", tokenizer="bundled", tokenizer_vocab=512, length=32, batch_size=4,
                val_fraction=0.25, device="cpu", progress=False)
    d = Distiller(DistillConfig(checkpoint=ckpt, out=str(tmp_path / "d"), **data))
    t = Trainer(TrainConfig(model="tiny", out=str(tmp_path / "t"), **data))
    assert torch.equal(d.val_blocks[:], t.val_blocks[:]) and torch.equal(d.train_blocks[:], t.train_blocks[:])
    d2 = Distiller(DistillConfig(checkpoint=ckpt, out=str(tmp_path / "d2"), **{**data, "val_fraction": 0.1}))
    assert d2.val_blocks.shape[0] < d.val_blocks.shape[0]
