"""The command line as a careless or hostile user meets it: every bad input ends with exit code
2, one line naming the flag or file, no traceback, and the run folder it aimed at unchanged;
run folders are never lost (--no-resume, --overwrite, changed flags on resume), nothing in a
checkpoint folder runs, the log has each step once after a crash, a corrupt newest checkpoint
falls back to the previous one, and config files mean what they say."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duo_fast.cli import main

TINY = ["--model", "tiny", "--tokenizer", "bundled", "--tokenizer-vocab", "300", "--length", "16", "--batch-size",
        "4", "--warmup-steps", "2", "--val-batches", "1", "--curriculum-end", "2", "--log-every", "1",
        "--no-progress", "--device", "cpu"]


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step tiny run (EMA off), with its checkpoints and export."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--steps", "4", "--ema", "0", "--save-every", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "empty.jsonl").write_text("\n\n")
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (d / "bad.yaml").write_text("lr: [1e-4,\n")
    (d / "unknown.yaml").write_text("learning_rate: 1e-4\n")
    (d / "badtype.yaml").write_text("steps: many\n")
    (d / "a_file").write_text("not a folder\n")
    return d


@pytest.fixture(scope="module")
def bad_config_export(finished_run, tmp_path_factory) -> Path:
    """The finished run's export with ``"model_length": "abc"`` in its config.json."""
    import shutil

    folder = tmp_path_factory.mktemp("badcfg") / "export"
    shutil.copytree(finished_run / "export", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_length"] = "abc"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _bad_inputs(run: Path, d: Path) -> list[tuple[list[str], str]]:
    """(argv, a fragment the one-line message must contain)."""
    out = ["--out", str(run)]
    new = ["--out", str(d / "never-created")]             # data errors: a new run that must not start
    ckpt = ["--checkpoint", str(run / "export")]
    return [
        (["train", *TINY, "--dataset", f"text:{d / 'empty.txt'}", *new], "empty.txt is empty"),
        (["train", *TINY, "--dataset", f"text:{d / 'latin1.txt'}", *new], "latin1.txt is not UTF-8"),
        (["train", *TINY, "--dataset", f"text:{d / 'empty.jsonl'}", *new], "empty.jsonl is empty"),
        (["train", *TINY, "--dataset", f"text:{d / 'broken.jsonl'}", *new], "broken.jsonl, line 2: not JSON"),
        (["train", *TINY, "--dataset", f"text:{d / 'notext.jsonl'}", *new], "no string field 'text'"),
        (["train", *TINY, "--dataset", f"text:{d / 'missing.txt'}", *new], "missing.txt"),
        (["train", *TINY, "--log-every", "0", *out], "--log-every"),
        (["train", *TINY, "--log-every", "2", "--check-every", "3", *out], "--check-every"),
        (["train", *TINY, "--val-batches", "0", *out], "--val-batches"),
        (["train", *TINY, "--tokenizer-vocab", "10", *out], "--tokenizer-vocab"),
        (["train", *TINY, "--keep-checkpoints", "0", *out], "keep_checkpoints"),
        (["train", *TINY, "--device", "tpu", *out], "--device tpu"),
        (["train", *TINY, "--relax-mode", "fast", *out], "--relax-mode"),
        (["train", *TINY, "--out", str(d / "a_file")], "a_file is a file"),
        (["train", *TINY, "--config", str(d / "bad.yaml"), *out], "bad.yaml: not valid YAML"),
        (["train", *TINY, "--config", str(d / "unknown.yaml"), *out], "unknown field(s) ['learning_rate']"),
        (["train", *TINY, "--config", str(d / "badtype.yaml"), *out], "'steps' must be int"),
        (["train", *TINY, "--config", str(d / "nothere.yaml"), *out], "nothere.yaml: no such file"),
        (["train", *TINY, "--bogus-flag", *out], "--bogus-flag"),
        # the finished run itself: not resumed with no more steps, not replaced, not mixed with other flags
        (["train", *TINY, "--steps", "4", "--ema", "0", "--save-every", "2", *out], "finished run of 4 steps"),
        (["train", *TINY, "--steps", "8", "--ema", "0", "--save-every", "2", "--no-resume", *out], "--no-resume"),
        (["train", *TINY, "--steps", "8", "--ema", "0", "--save-every", "2", "--lr", "1e-3", *out], "lr: 0.0003 -> 0.001"),
        (["train", *TINY, "--steps", "8", "--ema", "0.99", "--save-every", "2", *out], "ema: 0.0 -> 0.99"),
        (["train", *TINY, "--steps", "8", "--ema", "0", "--save-every", "2", "--model", "small", *out],
         "model: 'tiny' -> 'small'"),
        (["train", *TINY, "--steps", "8", "--ema", "0", "--save-every", "2", "--relax-mode", "dense", *out],
         "relax_mode: 'auto' -> 'dense'"),
        (["distill", "--no-progress", *out], "needs --checkpoint"),
        (["distill", *ckpt, "--dataset", "bundled", "--steps", "2", "--batch-size", "4", "--no-progress", *out],
         "holds no duo-fast distill run"),
        (["distill", *ckpt, "--dataset", "bundled", "--steps", "2", "--batch-size", "4", "--no-progress",
          "--out", str(d / "never-created"), "--loss", "kl"], "--loss"),
        (["sample", *ckpt, "--steps", "0"], "--steps must be >= 1"),
        (["sample", *ckpt, "--top-p", "1.5"], "--top-p"),
        (["sample", *ckpt, "--batch", "0"], "--batch must be >= 1"),
        (["sample", *ckpt, "--length", "-3"], "--length must be >= 1"),
        (["sample", *ckpt, "--length", "0"], "--length must be >= 1"),
        (["sample", *ckpt, "--num-samples", "0"], "--num-samples must be >= 1"),
        (["sample", *ckpt, "--psi-kappa", "5"], "--psi-kappa"),
        (["sample", *ckpt, "--psi-kappa", "a,b"], "--psi-kappa"),
        (["sample", *ckpt, "--out", str(d)], "is a folder"),
        (["train", *TINY, "--init-from", str(d / "nothing-here"), *new], "--init-from"),
        (["train", *TINY, "--init-from", str(run / "export"), "--length", "32", *new], "--init-from"),
        (["train", *TINY, "--val-samples", "1", "--val-gen-ppl-model", str(d / "a_file"), *new],
         "--val-gen-ppl-model"),
        (["train", *TINY, "--val-gen-ppl-model", "gpt2", *new], "needs --val-samples"),
        (["train", *TINY, "--lr-schedule", "linear", *new], "--lr-schedule"),
        (["train", *TINY, "--val-every", "-1", *new], "--val-every"),
        (["distill", *ckpt, "--dataset", "bundled", "--dt-growth", "linear", "--dt-min", "0", *new], "dt_min"),
        (["eval", *ckpt, "--gen-ppl", "--gen-ppl-batch", "0"], "--gen-ppl-batch"),
        (["eval", *ckpt, "--dataset", "lambada", "--lambada-file", str(d / "no.jsonl")], "--lambada-file"),
        (["sample", *ckpt, "--psi-high-mode", "remdm-0.1"], "--psi-high-mode"),
        (["sample", *ckpt, "--psi-time-profile", "linear-constant-linear-2"], "--psi-time-profile"),
        (["sample", *ckpt, "--psi-high-frac", "0.8", "--psi-middle-frac", "0.5"], "high_frac + middle_frac"),
        (["sample", *ckpt, "--psi-preset", "duo-loop-remdm", "--psi-kappa", "0.5"], "--psi-kappa"),
        (["sample", *ckpt, "--psi-preset", "nope"], "--psi-preset"),
        (["sample", *ckpt, "--infill", "no gaps here"], "--infill"),
        (["sample", *ckpt, "--infill", "a [GAP:x] b"], "--infill"),
        (["sample", *ckpt, "--infill", "a [GAP:0] b"], "--infill"),
        (["sample", *ckpt, "--prompt-file", str(d / "no-prompts.txt")], "--prompt-file"),
        (["sample", *ckpt, "--prompt", "a", "--infill", "b [GAP:2]"], "not allowed with"),
        (["sample", *ckpt, "--prompt", "word " * 40, "--length", "8"], "longer than the sampled length 8"),
        (["sample", "--checkpoint", str(d / "nothing-here")], "--checkpoint"),
        (["sample", "--checkpoint", str(d / "empty.txt")], "--checkpoint"),
        (["sample", *ckpt, "--tokenizer", str(d / "no-tokenizer")], "--tokenizer"),
        (["eval", *ckpt], "give --dataset, --gen-ppl (or --gen-ppl-model), or both"),
        (["eval", *ckpt, "--dataset", "bundled", "--eval-batch", "0"], "--eval-batch must be >= 1"),
        (["eval", *ckpt, "--dataset", "bundled", "--eval-length", "1"], "--eval-length must be >= 2"),
        (["eval", *ckpt, "--dataset", "nonsense"], "unknown evaluation dataset"),
        (["eval", *ckpt, "--dataset", "bundled", "--json", str(d / "no" / "r.json")], "--json"),
        (["eval", *ckpt, "--gen-ppl-model", str(d / "no-model"), "--samples", str(d / "no.jsonl")], "--samples"),
        (["bench", "kernels", "--repeats", "0"], "--repeats must be >= 1"),
        (["bench", "kernels", "--batch", "0"], "--batch must be >= 1"),
        (["bench", "kernels", "--json", str(d / "no" / "b.json")], "--json"),
        (["bench", "kernels", "--device", "gpu9"], "--device gpu9"),
    ] + ([] if torch.cuda.is_available() else [(["sample", *ckpt, "--device", "cuda"], "--device cuda")])


def test_every_bad_input_is_one_line_and_exit_2(finished_run, files, bad_config_export, capsys):
    before = _checksums(finished_run)
    failures = []
    cases = _bad_inputs(finished_run, files) + [
        (["sample", "--checkpoint", str(bad_config_export)], "model_length must be int, got 'abc'")]
    for argv, fragment in cases:
        capsys.readouterr()
        try:
            main(argv)
            failures.append(f"{argv}: accepted")
            continue
        except SystemExit as e:
            code = e.code
        except Exception as e:  # noqa: BLE001 - the point: no exception other than the exit
            failures.append(f"{argv}: {type(e).__name__}: {e}")
            continue
        err = capsys.readouterr().err.strip().splitlines()
        errors = [ln for ln in err if "warning" not in ln]
        if code != 2 or len(errors) != 1 or fragment not in errors[0] or "Traceback" in "\n".join(err):
            failures.append(f"{argv}: exit {code}, stderr {err[-3:]}, expected {fragment!r}")
    assert not failures, "\n".join(failures)
    assert _checksums(finished_run) == before, "a refused command changed the run folder"
    assert not (files / "never-created").exists()


def test_the_console_script_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "duo_fast.cli", "sample", "--checkpoint", "x", "--steps", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == "duo-fast sample: --steps must be >= 1, got 0"


def test_offline_hub_names_are_one_line(finished_run, tmp_path):
    """Hub names with no network: one line saying which name could not be reached and what to do."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ckpt = ["--checkpoint", str(finished_run / "export"), "--no-progress"]
    cases = [
        (["train", "--tokenizer", "gpt2", "--model", "tiny", "--out", str(tmp_path / "a")],
         "tokenizer 'gpt2' could not be loaded from the Hugging Face hub"),
        (["train", "--dataset", "wikitext2", "--model", "tiny", "--out", str(tmp_path / "b")],
         "dataset 'wikitext2' could not be loaded from the Hugging Face hub"),
        (["eval", *ckpt, "--dataset", "wikitext103"], "dataset 'wikitext103' could not be loaded from the Hugging Face hub"),
        (["eval", *ckpt, "--gen-ppl-model", "gpt2-large", "--steps", "1", "--batch", "1"],
         "--gen-ppl-model gpt2-large: cannot be loaded"),
        (["distill", *ckpt, "--steps", "2", "--out", str(tmp_path / "c")],       # the default data set: OpenWebText
         "dataset 'openwebtext' could not be loaded from the Hugging Face hub"),
    ]
    for argv, fragment in cases:
        proc = subprocess.run([sys.executable, "-m", "duo_fast.cli", *argv], capture_output=True, text=True,
                              timeout=300, env=env)
        lines = [ln for ln in proc.stderr.strip().splitlines() if "warning" not in ln]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and lines and fragment in lines[-1], \
            f"{argv}: exit {proc.returncode}: {proc.stderr[-1500:]}"


def test_help_lists_choices_once_and_uniform_booleans(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "{auto,adaptive,sparse,dense,topk}" in text and "--resume, --no-resume" in text
    assert "--progress, --no-progress" in text
    assert text.count("(default: 0.0003)") == 1
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    assert "--progress, --no-progress" in text and "--ema, --no-ema" in text


def test_yaml_values_take_the_fields_types(tmp_path):
    from duo_fast.cli import build_parser, train_config_from_args

    (tmp_path / "c.yaml").write_text("lr: 1e-4\nsteps: 1e3\nresume: 'false'\nrelax_mode: dense\n")
    cfg = train_config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")]))
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.steps == 1000 and cfg.resume is False


def test_overwrite_moves_the_old_run_aside(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _checksums(run)
    assert main(["train", *TINY, "--steps", "2", "--ema", "0", "--overwrite", "--out", str(run)]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and _checksums(aside[0]) == before             # the old run, untouched
    assert json.loads((run / "summary.json").read_text())["config"]["steps"] == 2


def test_resume_allows_safe_changes_and_logs_them(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(["train", *TINY, "--steps", "6", "--ema", "0", "--save-every", "3", "--out", str(run)]) == 0
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(6))
    event = next(r for r in records if r.get("event") == "resume")
    changes = {k: v for k, v in event["changes"].items() if k != "out"}          # the copy has another path
    assert changes == {"steps": {"old": 4, "new": 6}, "save_every": {"old": 2, "new": 3}}
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["steps"] == 6 and config["changes"][0]["changes"]["steps"] == {"old": 4, "new": 6}


def test_planted_pickle_is_refused_unrun_and_the_previous_checkpoint_used(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpts = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert [p.name for p in ckpts] == ["step000000001", "step000000003"]           # keep_checkpoints = 2
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 3, "metrics": Exploit()}, ckpts[-1] / "state.pt")
    assert main(["train", *TINY, "--steps", "5", "--ema", "0", "--save-every", "2", "--out", str(run)]) == 0
    assert not marker.exists(), "code from the checkpoint folder ran"
    out = capsys.readouterr().out
    assert "step000000003 is unusable" in out and "state.pt" in out
    assert (run / "checkpoints" / "corrupt-step000000003").is_dir()                # moved aside, not deleted
    steps = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(5))                                                 # resumed after step 1


def test_truncated_engine_file_falls_back(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    engine = run / "checkpoints" / "step000000003" / "engine.pt"
    engine.write_bytes(engine.read_bytes()[:1000])
    assert main(["train", *TINY, "--steps", "5", "--ema", "0", "--save-every", "2", "--out", str(run)]) == 0
    assert "engine.pt" in capsys.readouterr().out


def test_crash_mid_save_then_resume_logs_each_step_once(tmp_path, monkeypatch):
    """A kill at any moment (here: the process dies inside the step-5 save, after logging it):
    the resumed run drops the log lines after its checkpoint and logs every step once."""
    run = tmp_path / "run"
    args = ["train", *TINY, "--steps", "8", "--ema", "0", "--save-every", "3", "--out", str(run)]
    code = ("import sys; from duo_fast.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, DUO_FAST_TEST_DIE_IN_SAVE="5")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 17, proc.stderr[-2000:]
    logged = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == list(range(6))                                  # steps 3-5 logged, checkpoint only at 2
    assert main(args) == 0
    steps = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(8))


def test_text_data_is_validated_on_held_out_documents(tmp_path):
    from duo_fast.data import load_text_documents

    docs = [f"document number {i} " * 5 for i in range(40)]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(docs) + "\n")
    train = load_text_documents(f"text:{path}", "train", val_fraction=0.1)
    val = load_text_documents(f"text:{path}", "validation", val_fraction=0.1)
    assert len(val) == 4 and len(train) == 36 and not set(train) & set(val) and set(train) | set(val) == set(docs)
    assert load_text_documents(f"text:{path}", "validation", val_fraction=0.1) == val      # a fixed choice


def test_env_json_and_its_copy_in_summary(finished_run, capsys):
    assert main(["env", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"versions", "device", "backends", "caches"} <= set(info)
    assert info["versions"]["torch"] == torch.__version__ and info["backends"]["ttable_lookup"]["backend"] == "cpp"
    for op in ("rb_loss", "relaxed_embedding", "sample_posterior_linear"):
        assert info["backends"][op]["backend"] in ("triton", "cpp", "torch") and info["backends"][op]["why"]
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["environment"]["versions"]["torch"] == torch.__version__


def test_lengths_beyond_the_trained_one_are_warned_about(finished_run, capsys):
    out = finished_run.parent / "long.jsonl"
    assert main(["sample", "--checkpoint", str(finished_run / "export"), "--length", "40", "--steps", "1",
                 "--batch", "1", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: length 40 is beyond the model's trained length 16" in err
