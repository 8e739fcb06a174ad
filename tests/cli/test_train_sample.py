"""End to end: the CLI flags, a tiny curriculum-then-discrete run, sampling from its export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from duo_fast.cli import build_parser, main
from duo_fast.sampling import SamplerConfig, generate
from duo_fast.training.duo import TrainConfig, Trainer, tau_at


def _help(*cmd: str) -> str:
    out = subprocess.run([sys.executable, "-m", "duo_fast.cli", *cmd, "--help"], capture_output=True, text=True,
                         check=True)
    return out.stdout


def test_help_describes_every_flag():
    text = " ".join(_help("train").split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split())[:30] in text, f.name
    text = _help("sample")
    for action in build_parser()._subparsers._group_actions[0].choices["sample"]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.option_strings[-1] in text


def test_tau_schedule():
    cfg = TrainConfig(curriculum_start=10, curriculum_end=110, tau_log10_start=-1, tau_log10_end=-3)
    assert tau_at(cfg, 0) == pytest.approx(0.1) and tau_at(cfg, 60) == pytest.approx(0.01)
    assert tau_at(cfg, 110) == pytest.approx(1e-3)


def _tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(model="tiny", tokenizer="bundled", tokenizer_vocab=512, length=32, batch_size=8, steps=40, lr=2e-3,
                warmup_steps=5, ema=0.0, dropout=0.0, curriculum_end=20, tau_log10_start=-1, tau_log10_end=-2,
                gamma_min=-3.5, gamma_max=-1.75, val_batches=2, progress=False, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_in_both_phases(tmp_path):
    tr = Trainer(_tiny(tmp_path))
    x0 = tr.next_batch()
    for phase_step in (0, 30):                      # curriculum (step < 20) and discrete
        first = float(tr.loss_on(x0, phase_step).detach())
        for _ in range(15):
            tr.step(x0, phase_step)                  # overfit one batch
        last = float(tr.loss_on(x0, phase_step).detach())
        assert last < first, (phase_step, first, last)
    assert tr.in_curriculum(19) and not tr.in_curriculum(20)


def test_cli_train_then_sample(tmp_path, capsys):
    cfg = _tiny(tmp_path, steps=6, curriculum_end=3)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k != "steps"}))
    assert main(["train", "--config", str(cfg_file), "--steps", "6"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["steps"] == 6 and set(summary["tokens_per_s"]) == {"curriculum", "discrete"}
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--checkpoint", str(tmp_path / "run" / "export"), "--steps", "4", "--batch", "3",
                 "--num-samples", "5", "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["token_ids"]) == 32 and isinstance(r["text"], str) for r in rows)
    assert "NFE/s" in capsys.readouterr().out


def test_unknown_config_field_is_an_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(SystemExit, match=r"unknown field\(s\)"):
        main(["train", "--config", str(bad)])


def test_sampler_is_seeded_and_in_range():
    from duo_fast.model import DiT, DiTConfig

    model = DiT(DiTConfig.from_name("tiny", vocab_size=50, model_length=16, n_blocks=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    outs = [generate(model, SamplerConfig(steps=3, batch=4, seed=s, noise_removal=nr), progress=False)
            for s, nr in [(0, "none"), (0, "none"), (1, "none"), (0, "ancestral"), (0, "greedy")]]
    assert torch.equal(outs[0][0], outs[1][0]) and not torch.equal(outs[0][0], outs[2][0])
    for ids, _ in outs:
        assert ids.shape == (4, 16) and ids.min() >= 0 and ids.max() < 50
    assert outs[0][1]["nfe"] == 3 and outs[4][1]["nfe"] == 4


def test_cli_prompts_infill_and_psi_presets(tmp_path, capsys):
    """--prompt/--prompt-file/--infill keep their tokens in the JSONL rows; a --psi-preset runs with an
    explicit --steps overriding the recipe's 256."""
    cfg = _tiny(tmp_path, steps=2, curriculum_end=1)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k != "steps"}))
    assert main(["train", "--config", str(cfg_file), "--steps", "2"]) == 0
    ckpt = ["--checkpoint", str(tmp_path / "run" / "export"), "--no-progress", "--steps", "2", "--batch", "2"]
    out = tmp_path / "p.jsonl"
    assert main(["sample", *ckpt, "--prompt", "the cat", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    from duo_fast.data import get_tokenizer

    tok = get_tokenizer("bundled", cfg.tokenizer_vocab)
    want = [tok.bos_token_id] * (tok.bos_token_id is not None) + tok.encode("the cat", add_special_tokens=False)
    assert len(rows) == 2 and all(r["prompt"] == "the cat" and r["token_ids"][:len(want)] == want for r in rows)
    (tmp_path / "prompts.txt").write_text("one line\n\nanother line\n")
    assert main(["sample", *ckpt, "--prompt-file", str(tmp_path / "prompts.txt"), "--num-samples", "3", "--out",
                 str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["one line"] * 3 + ["another line"] * 3
    assert main(["sample", *ckpt, "--infill", "a [GAP:3] b", "--no-prompt-bos", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    a, b = tok.encode("a ", add_special_tokens=False), tok.encode(" b", add_special_tokens=False)   # pieces apart
    for r in rows:
        ids = r["token_ids"]
        assert ids[:len(a)] == a and ids[len(a) + 3:len(a) + 3 + len(b)] == b and r["template"] == "a [GAP:3] b"
    capsys.readouterr()
    assert main(["sample", *ckpt, "--psi-preset", "duo-max-rescale-eta"]) == 0
    text = capsys.readouterr().out
    assert "2 steps + ancestral final step" in text and "max-rescale-0.05" in text and "nucleus top-p 0.9: " in text
