"""`duo-fast distill` (DCD, section 6): rounds refresh the teacher, dt doubles per round, the
loss is a KL (>= 0), and the exported model samples through `duo-fast sample`."""

from __future__ import annotations

import json

import pytest
import torch

from duo_fast.checkpoint import save_hf_folder
from duo_fast.cli import main
from duo_fast.data import get_tokenizer
from duo_fast.distill import DistillConfig, _kl, dcd_gap
from duo_fast.model import DiT, DiTConfig


def _teacher_checkpoint(tmp_path) -> str:
    """A small model in the export layout of `duo-fast train` (bundled tokenizer named inside)."""
    K = len(get_tokenizer("bundled", 512))
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("tiny", vocab_size=K, model_length=32, n_blocks=2, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return str(save_hf_folder(model, tmp_path / "teacher", extra={"tokenizer": "bundled", "tokenizer_vocab": 512}))


def test_dt_schedule():
    cfg = DistillConfig(checkpoint="x", update_every=5, t_grid=8)
    assert [dcd_gap(s, cfg) for s in (0, 4, 5, 10, 15, 100)] == [(0, 0.125), (0, 0.125), (1, 0.25), (2, 0.5),
                                                                  (3, 1.0), (20, 1.0)]
    lin = DistillConfig(checkpoint="x", update_every=5, t_grid=8, dt_growth="linear")
    assert dcd_gap(12, lin) == (2, 3 / 8)


def test_kl_directions():
    a, b = torch.randn(3, 4, 11), torch.randn(3, 4, 11)
    assert torch.allclose(_kl(a, a, "kl-bwd"), torch.zeros(3, 4), atol=1e-6)
    pa, pb = a.softmax(-1).double(), b.softmax(-1).double()
    assert torch.allclose(_kl(a, b, "kl-bwd").double(), (pa * (pa.log() - pb.log())).sum(-1), atol=1e-5)
    assert torch.allclose(_kl(a, b, "kl-fwd").double(), (pb * (pb.log() - pa.log())).sum(-1), atol=1e-5)


def test_distill_rounds_then_sample(tmp_path):
    ckpt = _teacher_checkpoint(tmp_path)
    out = tmp_path / "dcd"
    assert main(["distill", "--checkpoint", ckpt, "--dataset", "bundled", "--batch-size", "4", "--steps", "20",
                 "--update-every", "5", "--t-grid", "8", "--warmup-steps", "2", "--lr", "1e-4", "--ema", "0.9",
                 "--out", str(out), "--progress", "false"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(20))
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
    with pytest.raises(SystemExit, match="unknown config field"):
        main(["distill", "--config", str(cfg)])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["distill", "--config", str(tmp_path / "missing.yaml")])
