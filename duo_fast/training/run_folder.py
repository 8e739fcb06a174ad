"""Run folders that never lose a user's work (``duo-fast train`` and ``distill``).

A run folder holds ``config.json`` (the configuration the run was started with, and every safe
change made on a resume), ``summary.json`` (written at the start with ``"status": "running"``,
rewritten at the end), ``log.jsonl``, ``checkpoints/`` and ``export/``.

:func:`plan` decides, before any heavy work and without writing anything, what a command may do
with ``--out``:

* an absent or empty folder: a new run;
* our own run folder with a complete checkpoint and ``resume``: continue it, if every field of the
  stored configuration equals the new one, except the fields declared safe to change (``steps``,
  ``save_every``, ``log_every``, ...), which are reported as changes;
* anything else (a different run, ``resume`` off, a finished run asked for no more steps, a
  folder that is not a run, a file): refused, unless ``overwrite``, which moves the old folder
  aside to ``OUT.old-<time>`` (never deletes it).

:func:`apply` then carries the plan out (rank 0 only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["RunPlan", "plan", "apply", "write_json_atomic", "truncate_log", "note_resume", "SAFE_TO_CHANGE"]

# fields that do not change what is computed up to the current step: a resume may change them
SAFE_TO_CHANGE = frozenset({"steps", "save_every", "log_every", "check_every", "progress", "tensorboard",
                            "keep_checkpoints", "resume", "overwrite", "compile", "val_batches", "val_every",
                            "val_samples", "val_sample_steps", "val_gen_ppl_model", "wandb", "wandb_project",
                            "device", "out"})


@dataclasses.dataclass
class RunPlan:
    out: Path
    action: str                               # "new", "resume", "overwrite"
    changes: dict[str, tuple[Any, Any]]       # safe fields changed on a resume: name -> (old, new)
    moved_to: Path | None = None


def _stored_config(out: Path, command: str) -> dict[str, Any] | None:
    """The configuration of a ``command`` run stored in ``out``, or None (no run of that command)."""
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(data, dict) or data.get("command", command) != command:
        return None
    return data.get("config") if isinstance(data.get("config"), dict) else None


def _finished(out: Path) -> bool:
    try:
        return json.loads((out / "summary.json").read_text()).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def plan(out: str | Path, config: dict[str, Any], resume: bool, overwrite: bool, has_checkpoint: bool,
         command: str = "train") -> RunPlan:
    """What to do with ``out`` (see the module docstring). Raises ``ValueError`` with one line
    naming the folder and the way out when the folder may not be used."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return RunPlan(out, "new", {})
    if overwrite:
        return RunPlan(out, "overwrite", {})
    stored = _stored_config(out, command)
    hint = "choose another --out, or pass --overwrite to move the old one aside"
    if stored is None:
        raise ValueError(f"--out {out} is not empty and holds no duo-fast {command} run; {hint}")
    if not resume:
        raise ValueError(f"--out {out} holds a {command} run and --no-resume was given; {hint}")
    if not has_checkpoint:
        raise ValueError(f"--out {out} holds a {command} run with no complete checkpoint to continue from; {hint}")
    # options the stored run does not record (added since) take their current value
    diffs = {k: (stored.get(k), config.get(k)) for k in sorted(set(stored) & set(config))
             if stored.get(k) != config.get(k)}
    safe = SAFE_TO_CHANGE - ({"steps"} if config.get("lr_schedule") == "cosine" else set())   # cosine decays to `steps`
    unsafe = {k: v for k, v in diffs.items() if k not in safe}
    if unsafe:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        raise ValueError(f"--out {out} holds a run with another configuration ({listed}); resume it with the same "
                         f"values, or {hint}")
    if _finished(out) and stored.get("steps") == config.get("steps"):
        raise ValueError(f"--out {out} holds a finished run of {config.get('steps')} steps; pass a larger --steps to "
                         f"extend it, or {hint}")
    return RunPlan(out, "resume", {k: v for k, v in diffs.items() if k not in ("resume", "overwrite")})


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def apply(p: RunPlan, config: dict[str, Any], command: str = "train",
          environment: dict[str, Any] | None = None) -> RunPlan:
    """Carry out ``p`` (rank 0): move an old folder aside, create the folder, write
    ``config.json`` and a ``summary.json`` marked running."""
    out = p.out
    if p.action == "overwrite":
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        os.replace(out, aside)
        p.moved_to = aside
    out.mkdir(parents=True, exist_ok=True)
    if p.action == "resume":
        stored = json.loads((out / "config.json").read_text())
        history = stored.get("changes", [])
        if p.changes:
            history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "changes": {k: {"old": a, "new": b} for k, (a, b) in p.changes.items()}})
        stored.update(config=config, changes=history)
        write_json_atomic(out / "config.json", stored)
    else:
        write_json_atomic(out / "config.json", {"command": command, "config": config, "changes": []})
    summary = {"status": "running", "config": config}
    if environment is not None:
        summary["environment"] = environment
    write_json_atomic(out / "summary.json", summary)
    return p


def truncate_log(path: Path, last_step: int, note: dict[str, Any]) -> int:
    """Keep the records of ``path`` (JSONL) up to ``last_step`` and append ``note``; returns the
    number of records dropped (steps the resumed run will log again)."""
    if not path.exists():
        with open(path, "w") as f:
            f.write(json.dumps(note) + "\n")
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:           # a line cut by a crash mid-write
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > last_step:
            dropped += 1
            continue
        kept.append(line)
    kept.append(json.dumps(note))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("\n".join(kept) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


def note_resume(p: RunPlan, step: int, checkpoint: Path, command: str) -> None:
    """Rank 0 of a resumed run: cut the log back to ``step``, append the resume record, and say
    what changed."""
    changes = {k: {"old": a, "new": b} for k, (a, b) in p.changes.items()}
    dropped = truncate_log(p.out / "log.jsonl", step, {"event": "resume", "from_checkpoint": checkpoint.name,
                                                       "next_step": step + 1, "changes": changes})
    if p.changes:
        print(f"duo-fast {command}: changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in
                                                                    p.changes.items()))
    if dropped:
        print(f"duo-fast {command}: {dropped} log lines after step {step} were dropped (those steps run again)")
