"""``duo-fast``: the command line (``train``, ``distill``, ``sample``, ``eval``, ``bench``).

Every input is checked before any heavy work; a bad one ends the command with one line naming
the flag or file and the problem, and exit code 2 (:class:`CliError`), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser", "train_config_from_args", "CliError"]


class CliError(SystemExit):
    """A usage or input error: ``main`` prints ``duo-fast CMD: message`` and exits with 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _fail(message: str) -> NoReturn:
    raise CliError(message)


class _Help(argparse.HelpFormatter):
    """Each flag's default once: appended unless the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown flag, bad choice) as one line and exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        _fail(f"{self.prog}: {message} (see {self.prog} --help)")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _add_dataclass_args(p: argparse.ArgumentParser, cls: type, presets: dict[str, dict[str, Any]]) -> None:
    """--preset, --config and one flag per field of the config dataclass ``cls``: booleans as
    ``--x/--no-x``, choices listed, each default shown once."""
    p.add_argument("--preset", choices=sorted(presets), default=None,
                   help="a named recipe: " + "; ".join(f"{k}: {v.get('dataset')}" for k, v in presets.items()))
    p.add_argument("--config", default=None, help=f"a JSON or YAML file of {cls.__name__} fields")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        helptext = f"{f.metadata['help']} (default: {f.default})"
        if _TYPES.get(str(f.type)) is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            p.add_argument(flag, dest=f.name, type=_TYPES.get(str(f.type), str), default=None, help=helptext,
                           choices=f.metadata.get("choices"))
    # the deepspeed launcher passes --local_rank; the rank comes from the environment either way
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from duo_fast.training.duo import TRAIN_PRESETS, TrainConfig

    p = sub.add_parser("train", help="train a Duo model (curriculum, then discrete USDM)",
                       description="Train a Duo denoiser. Values come from the dataclass defaults (the public "
                                   "recipe), then --preset, then --config, then the flags below.")
    _add_dataclass_args(p, TrainConfig, TRAIN_PRESETS)


def _add_distill(sub: argparse._SubParsersAction) -> None:
    from duo_fast.training.dcd import DISTILL_PRESETS, DistillConfig

    p = sub.add_parser("distill", help="Discrete Consistency Distillation of a trained model (few-step sampling)",
                       description="Distil a Duo model with DCD. Values come from the dataclass defaults (the public "
                                   "recipe), then --preset, then --config, then the flags below.")
    _add_dataclass_args(p, DistillConfig, DISTILL_PRESETS)


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a HF folder (config.json + model.safetensors / pytorch_model.bin), a hub id, or a Lightning .ckpt")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights of a Lightning checkpoint (--no-ema: its raw weights)")
    p.add_argument("--trust-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="allow arbitrary unpickling of .ckpt/.bin files (runs code from the file: only for files you trust)")
    p.add_argument("--tokenizer", default=None,
                   help="'bundled', a local folder or hub name (default: the checkpoint's own, else gpt2 for "
                        "K=50257/50258, bert-base-uncased for K=30522)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (only on a terminal)")


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    """The sampler's flags: one per flag field of ``SamplerConfig`` (its help, choices and default),
    then the Psi flags."""
    from duo_fast.sampling.config import flag_fields
    from duo_fast.sampling.psi import PSI_PRESETS, PsiConfig

    for f in flag_fields():
        flag = "--" + f.name.replace("_", "-")
        default = f.metadata["default_text"] or f.default
        typ = f.metadata["type"] or _TYPES.get(str(f.type), str)
        if typ is bool:
            # a boolean flag's default is its own (never taken from a Psi preset)
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"])
        else:
            # None: not given (a --psi-preset's value, else the default, fills it in: _check_sample_flags)
            p.add_argument(flag, dest=f.name, type=typ, default=None, choices=f.metadata["choices"],
                           help=f"{f.metadata['help']} (default {default})")
    p.add_argument("--num-samples", type=int, default=None,
                   help="total samples (default: one batch; with --prompt-file: per prompt, default 1)")
    p.add_argument("--psi-kappa", default=None,
                   help="Psi sampler: kappa (one value) or START,END (linear over the steps); 1 is ancestral")
    dp = PsiConfig()
    p.add_argument("--psi-preset", choices=sorted(PSI_PRESETS), default=None,
                   help="a Psi recipe of the public scripts/psi_samplers (steps, top-p, final step and the --psi-* "
                        "values below; flags given explicitly win)")
    p.add_argument("--psi-time-profile", default=None,
                   help=f"sampling.psi.time_profile: linear, linear-constant-linear-C or linear-constant-linear-C-inv "
                        f"(default {dp.time_profile})")
    for phase in ("high", "middle", "low"):
        p.add_argument(f"--psi-{phase}-mode", default=None,
                       help=f"sampling.psi.{phase}_mode: pure-posterior, pure-pc, constant-ETA, constant-remdm-ETA, "
                            f"max-capped-ETA or max-rescale-ETA (default {getattr(dp, phase + '_mode')})")
    for phase in ("high", "middle"):
        p.add_argument(f"--psi-{phase}-frac", type=float, default=None,
                       help=f"sampling.psi.{phase}_frac: fraction of the times in the {phase} phase "
                            f"(default {getattr(dp, phase + '_frac')})")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample text from a checkpoint with the few-step sampler")
    _add_checkpoint_args(p)
    _add_sample_args(p)
    p.add_argument("--out", default=None, help="write samples as JSONL (text, token ids, seed, steps) to this file")
    p.add_argument("--show", type=int, default=3, help="print this many samples")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--prompt", default=None, help="condition on this text: it is kept as the start of every sample")
    cond.add_argument("--prompt-file", default=None,
                      help="one prompt per line; --num-samples samples per prompt (default 1); JSONL rows carry the prompt")
    cond.add_argument("--infill", default=None,
                      help='a template with gaps, e.g. "The [GAP:12] of the [GAP:5]." (N tokens per gap): the text is '
                           "kept, only the gaps (and any positions after the template) are sampled")
    p.add_argument("--prompt-bos", action=argparse.BooleanOptionalAction, default=True,
                   help="start a prompt or template with the tokenizer's BOS token, as the training blocks start")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from duo_fast.data.eval_sets import EVAL_DATASETS

    p = sub.add_parser("eval", help="perplexity (RB NELBO) on a dataset, and/or generative perplexity of samples")
    _add_checkpoint_args(p)
    p.add_argument("--dataset", default=None,
                   help=f"{', '.join(EVAL_DATASETS)}, bundled, or text:PATH (a .txt, one document per line, or .jsonl)")
    p.add_argument("--insert-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="EOS after each document (default: the public rule of the set: none for the zero-shot sets, "
                        "EOS for openwebtext-valid, lm1b-wrap and local files)")
    p.add_argument("--lambada-file", default=None, help="a local copy of lambada_test.jsonl (the public code downloads it)")
    p.add_argument("--eval-batch", type=int, default=16, help="sequences per evaluation batch")
    p.add_argument("--eval-length", type=int, default=None, help="block length (default: the model's)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--gen-ppl", action=argparse.BooleanOptionalAction, default=False,
                   help="score samples (new, or --samples) by generative perplexity and unigram entropy")
    p.add_argument("--gen-ppl-model", default=None,
                   help="the causal LM (hub name or local folder) that scores them (default gpt2-large, as the public "
                        "code; giving it turns on --gen-ppl)")
    p.add_argument("--gen-ppl-batch", type=int, default=8, help="samples per scoring batch (public: 8)")
    p.add_argument("--protocol", choices=["public", "full"], default="public",
                   help="generative perplexity as the public code computes it (samples decoded with their special "
                        "tokens, retokenised, truncated to the sample length, batches of --gen-ppl-batch with the last "
                        "partial one dropped, only the first EOS counted), or full (every token of every sample)")
    p.add_argument("--samples", default=None, help="JSONL of `duo-fast sample` to score (default: sample anew)")
    _add_sample_args(p)
    p.add_argument("--json", default=None, help="write the results to this JSON file")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="reference-style vs duo_fast: kernels, sampling, training steps")
    p.add_argument("what", choices=["kernels", "sample", "train", "all"], help="which group of cases")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="tiny: CPU sizes; small: the GPU shapes")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch")
    p.add_argument("--length", type=int, default=None, help="override the preset's sequence length")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path at least (median reported)")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="time each path (alternating with the other) until both have run this long")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (only on a terminal)")


def _add_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="versions, device, and which implementation each operator uses and why")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _cmd_env(args: argparse.Namespace) -> int:
    from duo_fast.environment import environment, print_environment

    info = environment(_check_device(args.device))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_environment(info)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="duo-fast", description="Fast Duo: training, distillation and sampling "
                     "of uniform-state discrete diffusion language models.")
    # the deepspeed launcher passes --local_rank=N before the command's own flags
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_distill(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_env(sub)
    return parser


def _coerce(value: Any, typ: type, name: str, source: str) -> Any:
    """A config-file value as the field's declared type (YAML reads ``1e-4`` as a string)."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            f = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            f = None
        if f is not None and f.is_integer():
            return int(f)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    _fail(f"{source}: field {name!r} must be {typ.__name__}, got {value!r}")


def _read_config_file(path_text: str, command: str) -> dict[str, Any]:
    path = Path(path_text)
    if not path.is_file():
        _fail(f"--config {path_text}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"--config {path_text}: cannot be read ({type(e).__name__})")
    if path_text.endswith((".yaml", ".yml")):
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            _fail(f"--config {path_text}: not valid YAML" + (f" (line {where.line + 1})" if where else ""))
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(f"--config {path_text}: not valid JSON (line {e.lineno}: {e.msg})")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        _fail(f"--config {path_text}: must hold a mapping of field names to values")
    return loaded


def config_from_args(args: argparse.Namespace, cls: type, presets: dict[str, dict[str, Any]]) -> Any:
    """Dataclass defaults, then --preset, then --config (unknown fields are an error; values are
    coerced to the fields' types), then flags."""
    values: dict[str, Any] = {}
    if args.preset:
        values.update(presets[args.preset])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if args.config:
        loaded = _read_config_file(args.config, args.command)
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            _fail(f"--config {args.config}: unknown field(s) {unknown}")
        for k, v in loaded.items():
            f = fields[k]
            v = _coerce(v, _TYPES.get(str(f.type), str), k, f"--config {args.config}")
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                _fail(f"--config {args.config}: field {k!r} must be one of {list(choices)}, got {v!r}")
            values[k] = v
    for name in fields:
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    try:
        return cls(**values)
    except ValueError as e:
        _fail(str(e))


def train_config_from_args(args: argparse.Namespace) -> Any:
    from duo_fast.training.duo import TRAIN_PRESETS, TrainConfig

    return config_from_args(args, TrainConfig, TRAIN_PRESETS)


def _launcher_rank(args: argparse.Namespace) -> None:
    """``deepspeed`` passes ``--local_rank=N`` (and sets LOCAL_RANK); torchrun sets only the variable."""
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))


def _check_device(name: str) -> Any:
    from duo_fast.core.devices import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        _fail(f"--device {name}: {e}")


def _cmd_train(args: argparse.Namespace) -> int:
    from duo_fast.training.duo import train

    _launcher_rank(args)
    cfg = train_config_from_args(args)
    device = _check_device(cfg.device)
    if device.type == "cpu" and cfg.model != "tiny" and cfg.steps >= 100_000:
        print(f"duo-fast train: warning: the full recipe ({cfg.model} model, {cfg.steps:,} steps of {cfg.batch_size} "
              f"sequences) on a CPU would take months; for a CPU run try --preset demo", file=sys.stderr)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError) as e:       # bad input found before training: a clear message
        _fail(str(e))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from duo_fast.training.dcd import DISTILL_PRESETS, DistillConfig, distill

    _launcher_rank(args)
    cfg = config_from_args(args, DistillConfig, DISTILL_PRESETS)
    _check_device(cfg.device)
    try:
        distill(cfg)
    except (ValueError, FileNotFoundError) as e:       # bad input found before distilling: a clear message
        _fail(str(e))
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(model, info, tokenizer or None, device) for ``sample`` and ``eval``."""
    from duo_fast.data import check_tokenizer_vocab, tokenizer_for_vocab
    from duo_fast.io.pretrained import CheckpointError, describe, load_pretrained

    device = _check_device(args.device)
    try:
        model, info = load_pretrained(args.checkpoint, ema=args.ema, device=device,
                                      trust_checkpoint=args.trust_checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        _fail(f"--checkpoint: cannot load it: {e}")
    print(f"loaded {describe(info)}")
    meta = info.extra
    name = args.tokenizer or meta.get("tokenizer") or tokenizer_for_vocab(info.vocab_size)
    tokenizer = None
    if not args.tokenizer and info.tokenizer is not None:      # the one pickled in a public .ckpt (read as data)
        tokenizer, name = info.tokenizer, None
        print(f"tokenizer: the one saved in the checkpoint ({info.tokenizer.name_or_path or 'unnamed'}, "
              f"{len(info.tokenizer)} ids)")
        try:
            check_tokenizer_vocab(tokenizer, info.vocab_size)
        except ValueError as e:
            _fail(str(e))
    if name:
        tokenizer = _tokenizer(name, meta.get("tokenizer_vocab", 4096))
        try:
            check_tokenizer_vocab(tokenizer, info.vocab_size)
        except ValueError as e:
            _fail(f"--tokenizer: {e}")
    length = getattr(args, "length", None) or getattr(args, "eval_length", None)
    if length and length > model.config.model_length:
        print(f"duo-fast: warning: length {length} is beyond the model's trained length {model.config.model_length}; "
              f"expect worse samples and perplexities", file=sys.stderr)
    return model, info, tokenizer, device


def _tokenizer(name: str, vocab: int) -> Any:
    """A tokenizer by name, with one line when a hub name cannot be reached."""
    from duo_fast.data import get_tokenizer

    try:
        return get_tokenizer(name, vocab)
    except ValueError as e:             # offline hub names, bad folders: one line naming the tokenizer
        _fail(f"--tokenizer: {e}")


def _kappa(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        _fail(f"--psi-kappa takes KAPPA or START,END, got {text!r}")
    if len(vals) not in (1, 2) or not all(0.0 <= v <= 1.0 for v in vals):
        _fail(f"--psi-kappa takes KAPPA or START,END with values in [0, 1], got {text!r}")
    return (vals[0], vals[-1])


def _check_sample_flags(args: argparse.Namespace) -> None:
    """Every sampling flag, before the model is loaded: fills in the preset's and the default
    values, ``args.psi`` (a PsiConfig or None) and ``args.kappa``, and checks them as
    ``SamplerConfig`` does (its messages, naming the flag)."""
    from duo_fast.sampling.config import SamplerConfigError, flag_fields
    from duo_fast.sampling.psi import PSI_PRESETS, PsiConfig

    preset = PSI_PRESETS.get(args.psi_preset or "", {})
    for f in flag_fields():
        if getattr(args, f.name) is None and f.default is not None:
            setattr(args, f.name, preset.get(f.name, f.default))
    if args.num_samples is not None and args.num_samples < 1:
        _fail(f"--num-samples must be >= 1, got {args.num_samples}")
    args.kappa = _kappa(args.psi_kappa)
    fields = {"time_profile": args.psi_time_profile, "high_mode": args.psi_high_mode,
              "middle_mode": args.psi_middle_mode, "low_mode": args.psi_low_mode, "high_frac": args.psi_high_frac,
              "middle_frac": args.psi_middle_frac}
    given = {k: v for k, v in fields.items() if v is not None}
    args.psi = None
    if preset or given:
        if args.psi_kappa is not None:
            _fail("--psi-kappa (a linear kappa ramp) cannot be combined with --psi-preset or the --psi-* schedule flags")
        base = preset.get("psi", PsiConfig())
        try:
            args.psi = PsiConfig(**{**base.__dict__, **given})
        except ValueError as e:
            flag = next((f"--{k.replace('_', '-')}" for k in ("psi_time_profile", "psi_high_mode", "psi_middle_mode",
                                                               "psi_low_mode", "psi_high_frac", "psi_middle_frac")
                         if k[4:] in str(e)), "--psi-*")
            _fail(f"{flag}: {e}")
    try:
        _sampler_config(args, args.batch, args.seed)
    except SamplerConfigError as e:
        flag = {"kappa": "--psi-kappa"}.get(e.field, "--" + e.field.replace("_", "-"))
        _fail(f"{flag} {e.detail}")
    if getattr(args, "infill", None) is not None:
        from duo_fast.sampling.conditioning import infill_pieces

        _conditioning_call(lambda: infill_pieces(args.infill))
    pf = getattr(args, "prompt_file", None)
    if pf is not None and not Path(pf).is_file():
        _fail(f"--prompt-file {pf}: no such file")
    out = getattr(args, "out", None)
    if out and Path(out).is_dir():
        _fail(f"--out {out} is a folder; give a file name for the JSONL")


def _sampler_config(args: argparse.Namespace, batch: int, seed: int) -> Any:
    """The ``SamplerConfig`` of the checked flags (``_check_sample_flags``) for one batch."""
    from duo_fast.sampling.config import SamplerConfig, flag_fields

    return SamplerConfig(batch=batch, seed=seed, kappa=args.kappa, psi=args.psi,
                         **{f.name: getattr(args, f.name) for f in flag_fields() if f.name != "batch"})


def _conditioning_call(fn: Any) -> Any:
    """Run a conditioning helper; its ValueError (a message naming the flag) becomes one line."""
    try:
        return fn()
    except ValueError as e:
        _fail(str(e))


def _conditions(args: argparse.Namespace, tokenizer: Any, length: int) -> list[dict]:
    """The conditioning groups of ``--prompt`` / ``--prompt-file`` / ``--infill`` (``sampling.conditioning``)."""
    from duo_fast.sampling.conditioning import condition_groups

    prompt, pf, infill = getattr(args, "prompt", None), getattr(args, "prompt_file", None), getattr(args, "infill", None)
    prompts = None
    if prompt is not None:
        prompts = [prompt]
    elif pf is not None:
        prompts = [x for x in Path(pf).read_text().splitlines() if x.strip()]
    return _conditioning_call(lambda: condition_groups(tokenizer, length, prompts, infill, getattr(args, "prompt_bos", True),
                                                       source=f"--prompt-file {pf}"))


def _check_json_target(path: str | None) -> None:
    if path and not Path(path).resolve().parent.is_dir():
        _fail(f"--json {path}: the folder {Path(path).resolve().parent} does not exist")


def _progress(flag: bool) -> bool:
    """Progress bars only on a terminal (tqdm writes to stderr)."""
    return flag and sys.stderr.isatty()


def _sample_rows(args: argparse.Namespace, model: Any, tokenizer: Any, device: Any) -> tuple[list[dict], dict]:
    import time

    import torch

    from duo_fast.sampling import generate

    L = args.length or model.config.model_length
    groups = _conditions(args, tokenizer, L)
    conditional = groups[0]["prefix"] is not None
    per_group = args.num_samples or (1 if conditional and len(groups) > 1 else args.batch)
    rows, seconds, capture, nfe, call = [], 0.0, 0.0, 0, 0
    t_all = time.perf_counter()
    for g in groups:
        prefix = None if g["prefix"] is None else torch.tensor(g["prefix"], dtype=torch.int64)
        mask = None if g["mask"] is None else torch.tensor(g["mask"], dtype=torch.bool)
        for i in range(math.ceil(per_group / args.batch)):
            b = min(args.batch, per_group - i * args.batch)
            scfg = _sampler_config(args, b, args.seed + call)
            call += 1
            ids, stats = generate(model, scfg, device=device, progress=_progress(args.progress),
                                  prefix=None if prefix is None else prefix.expand(b, -1),
                                  known_mask=None if mask is None else mask.expand(b, -1))
            seconds += stats["wall_seconds"]
            capture += stats["graph_capture_seconds"]
            nfe += stats["nfe"]
            for row in ids.cpu().tolist():
                text = tokenizer.decode(row, skip_special_tokens=True) if tokenizer is not None else None
                decoded = tokenizer.decode(row) if tokenizer is not None else None    # the public batch_decode
                rows.append({**g["row"], "text": text, "decoded": decoded, "token_ids": row, "seed": scfg.seed,
                             "steps": args.steps, "noise_removal": args.noise_removal, "top_p": args.top_p})
    # every rate over the sampling calls' whole wall time, graph captures included
    stats = {"samples": len(rows), "length": L, "seconds": seconds, "graph_capture_seconds": capture,
             "wall_seconds": time.perf_counter() - t_all, "nfe": nfe, "samples_per_s": len(rows) / seconds,
             "tokens_per_s": len(rows) * L / seconds, "nfe_per_s": nfe / seconds}
    return rows, stats


def _print_throughput(st: dict) -> None:
    print(f"throughput: {st['samples_per_s']:.2f} samples/s, {st['tokens_per_s']:,.0f} tokens/s, "
          f"{st['nfe_per_s']:.2f} NFE/s ({st['nfe']} denoiser calls in {st['seconds']:.2f} s of sampling, "
          f"CUDA-graph capture {st['graph_capture_seconds']:.2f} s of it; "
          f"{st['wall_seconds']:.2f} s wall time with decoding)")


def _cmd_sample(args: argparse.Namespace) -> int:
    _check_sample_flags(args)
    model, info, tokenizer, device = _load(args)
    rows, st = _sample_rows(args, model, tokenizer, device)
    print(f"duo-fast sample: {st['samples']} samples of length {st['length']}, {args.steps} steps + "
          f"{args.noise_removal} final step, device={device}")
    if args.psi is not None:
        print(f"Psi sampler: {args.psi}")
    if args.top_p < 1:
        from duo_fast.ops.backends import choose
        from duo_fast.ops.posterior import NUCLEUS_METHOD

        probe = next(model.parameters())
        print(f"nucleus top-p {args.top_p}: {NUCLEUS_METHOD[choose('sample_posterior', probe).impl]}")
    for r in rows[: args.show]:
        print("---", (r["text"] if r["text"] is not None else str(r["token_ids"][:40]))[:400].replace("\n", " "))
    _print_throughput(st)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(rows)} samples to {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from duo_fast.data.eval_sets import eval_blocks, eval_pad_id
    from duo_fast.eval.gen_ppl import generative_perplexity, unigram_entropy
    from duo_fast.eval.nelbo import evaluate_nelbo

    if args.gen_ppl_model:
        args.gen_ppl = True
    args.gen_ppl_model = args.gen_ppl_model or "gpt2-large"
    if not args.dataset and not args.gen_ppl:
        _fail("give --dataset, --gen-ppl (or --gen-ppl-model), or both")
    if args.gen_ppl_batch < 1:
        _fail(f"--gen-ppl-batch must be >= 1, got {args.gen_ppl_batch}")
    _check_sample_flags(args)
    for flag, v, low in (("--eval-batch", args.eval_batch, 1), ("--eval-length", args.eval_length, 2),
                         ("--max-batches", args.max_batches, 1)):
        if v is not None and v < low:
            _fail(f"{flag} must be >= {low}, got {v}")
    if args.samples and not Path(args.samples).is_file():
        _fail(f"--samples {args.samples}: no such file")
    if args.lambada_file and not Path(args.lambada_file).is_file():
        _fail(f"--lambada-file {args.lambada_file}: no such file")
    _check_json_target(args.json)
    model, info, tokenizer, device = _load(args)
    result: dict[str, Any] = {"checkpoint": args.checkpoint, "weights": info.weights}
    if args.dataset:
        if tokenizer is None:
            _fail("--dataset needs a tokenizer: pass --tokenizer")
        length = args.eval_length or model.config.model_length
        try:
            blocks = eval_blocks(args.dataset, tokenizer, length, insert_eos=args.insert_eos,
                                 lambada_file=args.lambada_file)
        except (ValueError, FileNotFoundError) as e:
            _fail(f"--dataset {args.dataset}: {e}")
        r = evaluate_nelbo(model, blocks, batch_size=args.eval_batch, seed=args.seed, device=device,
                           max_batches=args.max_batches, progress=_progress(args.progress),
                           pad_id=eval_pad_id(args.dataset, tokenizer))
        result.update(dataset=args.dataset, length=length, **r)
        print(f"{args.dataset}: NELBO {r['nelbo']:.4f} nats/token, perplexity <= {r['ppl']:.2f} "
              f"({r['tokens']:,} tokens, {r['batches']} batches of {args.eval_batch})")
    if args.gen_ppl:
        if args.samples:
            try:
                rows = [json.loads(x) for x in Path(args.samples).read_text().splitlines() if x.strip()]
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                _fail(f"--samples {args.samples}: not a JSONL file of samples ({type(e).__name__})")
        else:
            if tokenizer is None:
                _fail("decoding samples needs a tokenizer: pass --tokenizer")
            rows, st = _sample_rows(args, model, tokenizer, device)
            _print_throughput(st)
        key = "decoded" if args.protocol == "public" else "text"      # public: decoded with the special tokens
        texts = [(r.get(key) or r.get("text")) if isinstance(r, dict) else None for r in rows]
        if not texts or any(not isinstance(t, str) for t in texts):
            _fail("the samples have no text to score")
        length = len(rows[0].get("token_ids") or []) or model.config.model_length
        try:
            g = generative_perplexity(texts, args.gen_ppl_model, device=device, max_length=length,
                                      batch_size=args.gen_ppl_batch, protocol=args.protocol)
        except OSError as e:
            local = Path(args.gen_ppl_model).exists()
            _fail(f"--gen-ppl-model {args.gen_ppl_model}: cannot be loaded ({type(e).__name__})" +
                  ("" if local else "; offline, the hub cannot be reached: pass a local model folder"))
        ent = unigram_entropy([r["token_ids"] for r in rows])
        result.update(gen_ppl_model=args.gen_ppl_model, num_samples=len(rows), unigram_entropy=ent, **g)
        print(f"generative perplexity under {args.gen_ppl_model} ({args.protocol} protocol): {g['gen_ppl']:.2f} "
              f"({g['tokens']:,} tokens, {g['samples_scored']} of {len(rows)} samples scored); unigram entropy "
              f"{ent:.3f} nats")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from duo_fast.bench.suite import GROUPS, print_suite, run_suite
    for flag, v in (("--repeats", args.repeats), ("--batch", args.batch), ("--length", args.length)):
        if v is not None and v < 1:
            _fail(f"{flag} must be >= 1, got {v}")
    if not 0 <= args.min_seconds <= 600:
        _fail(f"--min-seconds must be in [0, 600], got {args.min_seconds}")
    _check_json_target(args.json)
    device = _check_device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    groups = list(GROUPS) if args.what == "all" else [args.what]
    res = run_suite(groups, args.preset, device, dtype, args.batch, args.length, args.repeats,
                    progress=_progress(args.progress), min_seconds=args.min_seconds)
    print_suite(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")
    if not res["all_match"]:
        print("duo-fast bench: some outputs disagree with the reference: their timings are not valid")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``duo-fast`` entry point. A bad input prints one line to stderr and raises
    :class:`CliError` (exit code 2)."""
    command = "duo-fast"
    try:
        args = build_parser().parse_args(argv)
        command = f"duo-fast {args.command}"
        from duo_fast.ops.backends import check_environment

        try:
            check_environment()                 # DUO_FAST_IMPL, DUO_FAST_TTABLE_IMPL: one line, not ignored
        except ValueError as e:
            _fail(str(e))
        if args.launcher_local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(args.launcher_local_rank))
        commands = {"train": _cmd_train, "distill": _cmd_distill, "sample": _cmd_sample, "eval": _cmd_eval,
                    "bench": _cmd_bench, "env": _cmd_env}
        return commands[args.command](args)
    except CliError as e:
        line = e.message if e.message.startswith("duo-fast") else f"{command}: {e.message}"
        print(line.splitlines()[0] if line else command, file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
