"""``duo-fast``: the command line (``train``, ``sample``, ``eval``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "train_config_from_args"]


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _add_dataclass_args(p: argparse.ArgumentParser, cls: type, presets: dict[str, dict[str, Any]]) -> None:
    """--preset, --config and one flag per field of the config dataclass ``cls``."""
    p.add_argument("--preset", choices=sorted(presets), default=None,
                   help="a named recipe: " + "; ".join(f"{k}: {v.get('dataset')}" for k, v in presets.items()))
    p.add_argument("--config", default=None, help=f"a JSON or YAML file of {cls.__name__} fields")
    for f in dataclasses.fields(cls):
        typ = _bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(str(f.type), f.type)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ, default=None,
                       help=f"{f.metadata['help']} (default: {f.default})")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train import TRAIN_PRESETS, TrainConfig

    p = sub.add_parser("train", help="train a Duo model (curriculum, then discrete USDM)",
                       description="Train a Duo denoiser. Values come from the dataclass defaults (the public "
                                   "recipe), then --preset, then --config, then the flags below.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataclass_args(p, TrainConfig, TRAIN_PRESETS)


def _add_distill(sub: argparse._SubParsersAction) -> None:
    from .distill import DISTILL_PRESETS, DistillConfig

    p = sub.add_parser("distill", help="Discrete Consistency Distillation of a trained model (few-step sampling)",
                       description="Distil a Duo model with DCD. Values come from the dataclass defaults (the public "
                                   "recipe), then --preset, then --config, then the flags below.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataclass_args(p, DistillConfig, DISTILL_PRESETS)


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a HF folder (config.json + model.safetensors / pytorch_model.bin), a hub id, or a Lightning .ckpt")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights of a Lightning checkpoint, not its EMA")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary unpickling of .ckpt/.bin files (runs code from the file: only for files you trust)")
    p.add_argument("--tokenizer", default=None,
                   help="'bundled', a local folder or hub name (default: the checkpoint's, else gpt2 for K=50257/50258, "
                        "bert-base-uncased for K=30522)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=8, help="denoiser calls before the final step (NFE)")
    p.add_argument("--batch", type=int, default=16, help="sequences sampled in parallel")
    p.add_argument("--num-samples", type=int, default=None, help="total samples (default: one batch)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--schedule", choices=["loglinear", "cosine"], default="loglinear", help="noise schedule of the time grid")
    p.add_argument("--noise-removal", choices=["greedy", "ancestral", "none"], default="greedy",
                   help="final step at t_min: argmax (Greedy-Tail), posterior with alpha_s = 1, or nothing")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of x_theta (1.0: off)")
    p.add_argument("--psi-kappa", default=None,
                   help="Psi sampler: kappa (one value) or START,END (linear over the steps); 1 is ancestral")
    p.add_argument("--unfused", action="store_true",
                   help="write the logits and sample from them (default: draws fused with the output projection)")
    p.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, run the step loop eagerly (no CUDA graph)")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample text from a checkpoint with the few-step sampler",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_checkpoint_args(p)
    _add_sample_args(p)
    p.add_argument("--out", default=None, help="write samples as JSONL (text, token ids, seed, steps) to this file")
    p.add_argument("--show", type=int, default=3, help="print this many samples")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .evaluate import EVAL_DATASETS

    p = sub.add_parser("eval", help="perplexity (RB NELBO) on a dataset, and/or generative perplexity of samples",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_checkpoint_args(p)
    p.add_argument("--dataset", default=None,
                   help=f"{', '.join(EVAL_DATASETS)}, bundled, or text:PATH (a .txt, one document per line, or .jsonl)")
    p.add_argument("--eval-batch", type=int, default=16, help="sequences per evaluation batch")
    p.add_argument("--eval-length", type=int, default=None, help="block length (default: the model's)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--gen-ppl-model", default=None,
                   help="a causal LM (hub name or local folder) for the generative perplexity of samples")
    p.add_argument("--samples", default=None, help="JSONL of `duo-fast sample` to score (default: sample anew)")
    _add_sample_args(p)
    p.add_argument("--json", default=None, help="write the results to this JSON file")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="reference-style vs duo_fast: kernels, sampling, training steps",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["kernels", "sample", "train", "all"], help="which group of cases")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="tiny: CPU sizes; small: the GPU shapes")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch")
    p.add_argument("--length", type=int, default=None, help="override the preset's sequence length")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (median reported)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duo-fast", description="Fast Duo: training, distillation and sampling "
                                     "of uniform-state discrete diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_distill(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_bench(sub)
    return parser


def config_from_args(args: argparse.Namespace, cls: type, presets: dict[str, dict[str, Any]]) -> Any:
    """Dataclass defaults, then --preset, then --config (unknown fields are an error), then flags."""
    values: dict[str, Any] = {}
    if args.preset:
        values.update(presets[args.preset])
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"duo-fast {args.command}: config file {args.config} does not exist")
        text = path.read_text()
        if args.config.endswith((".yaml", ".yml")):
            import yaml

            loaded = yaml.safe_load(text) or {}
        else:
            loaded = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise SystemExit(f"duo-fast {args.command}: unknown config field(s) {unknown} in {args.config}")
        values.update(loaded)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    try:
        return cls(**values)
    except ValueError as e:
        raise SystemExit(f"duo-fast {args.command}: {e}") from e


def train_config_from_args(args: argparse.Namespace) -> Any:
    from .train import TRAIN_PRESETS, TrainConfig

    return config_from_args(args, TrainConfig, TRAIN_PRESETS)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = train_config_from_args(args)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError) as e:       # bad input found before training: a clear message
        raise SystemExit(f"duo-fast train: {e}") from e
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DISTILL_PRESETS, DistillConfig, distill

    cfg = config_from_args(args, DistillConfig, DISTILL_PRESETS)
    try:
        distill(cfg)
    except (ValueError, FileNotFoundError) as e:       # bad input found before distilling: a clear message
        raise SystemExit(f"duo-fast distill: {e}") from e
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(model, info, tokenizer or None, device) for ``sample`` and ``eval``."""
    from .data import get_tokenizer
    from .evaluate import check_tokenizer_vocab
    from .pretrained import CheckpointError, describe, load_pretrained
    from .train import resolve_device

    device = resolve_device(args.device)
    try:
        model, info = load_pretrained(args.checkpoint, ema=not args.no_ema, device=device,
                                      trust_checkpoint=args.trust_checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"duo-fast: cannot load checkpoint: {e}") from e
    print(f"loaded {describe(info)}")
    meta = info.extra
    name = args.tokenizer or meta.get("tokenizer") or {50257: "gpt2", 50258: "gpt2", 30522: "bert-base-uncased"}.get(
        info.vocab_size)
    tokenizer = None
    if not args.tokenizer and info.tokenizer is not None:      # the one pickled in a public .ckpt (read as data)
        tokenizer, name = info.tokenizer, None
        print(f"tokenizer: the one saved in the checkpoint ({info.tokenizer.name_or_path or 'unnamed'}, "
              f"{len(info.tokenizer)} ids)")
        try:
            check_tokenizer_vocab(tokenizer, info.vocab_size)
        except ValueError as e:
            raise SystemExit(f"duo-fast: {e}") from e
    if name:
        try:
            tokenizer = get_tokenizer(name, meta.get("tokenizer_vocab", 4096))
        except Exception as e:  # noqa: BLE001 - offline hub names, bad folders
            raise SystemExit(f"duo-fast: cannot load tokenizer {name!r}: {e}") from e
        try:
            check_tokenizer_vocab(tokenizer, info.vocab_size)
        except ValueError as e:
            raise SystemExit(f"duo-fast: {e}") from e
    return model, info, tokenizer, device


def _kappa(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError as e:
        raise SystemExit(f"duo-fast: --psi-kappa takes KAPPA or START,END, got {text!r}") from e
    if len(vals) not in (1, 2):
        raise SystemExit(f"duo-fast: --psi-kappa takes KAPPA or START,END, got {text!r}")
    return (vals[0], vals[-1])


def _sample_rows(args: argparse.Namespace, model: Any, tokenizer: Any, device: Any) -> tuple[list[dict], dict]:
    from .sampling import SamplerConfig, generate

    import time

    total = args.num_samples or args.batch
    rows, seconds, capture, nfe = [], 0.0, 0.0, 0
    t_all = time.perf_counter()
    for i in range(math.ceil(total / args.batch)):
        b = min(args.batch, total - i * args.batch)
        scfg = SamplerConfig(steps=args.steps, batch=b, length=args.length, noise_removal=args.noise_removal,
                             schedule=args.schedule, top_p=args.top_p, kappa=_kappa(args.psi_kappa),
                             seed=args.seed + i, fused=not args.unfused, cuda_graph=not args.no_cuda_graph)
        ids, stats = generate(model, scfg, device=device, progress=not args.no_progress)
        seconds += stats["wall_seconds"]
        capture += stats["graph_capture_seconds"]
        nfe += stats["nfe"]
        for row in ids.cpu().tolist():
            text = tokenizer.decode(row, skip_special_tokens=True) if tokenizer is not None else None
            rows.append({"text": text, "token_ids": row, "seed": scfg.seed, "steps": args.steps,
                         "noise_removal": args.noise_removal, "top_p": args.top_p})
    L = len(rows[0]["token_ids"])
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
    model, info, tokenizer, device = _load(args)
    rows, st = _sample_rows(args, model, tokenizer, device)
    print(f"duo-fast sample: {st['samples']} samples of length {st['length']}, {args.steps} steps + "
          f"{args.noise_removal} final step, device={device}")
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
    from .evaluate import eval_blocks, evaluate_nelbo, generative_perplexity, unigram_entropy

    if not args.dataset and not args.gen_ppl_model:
        raise SystemExit("duo-fast eval: give --dataset, --gen-ppl-model, or both")
    model, info, tokenizer, device = _load(args)
    result: dict[str, Any] = {"checkpoint": args.checkpoint, "weights": info.weights}
    if args.dataset:
        if tokenizer is None:
            raise SystemExit("duo-fast eval: --dataset needs a tokenizer (--tokenizer)")
        length = args.eval_length or model.config.model_length
        try:
            blocks = eval_blocks(args.dataset, tokenizer, length)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"duo-fast eval: {e}") from e
        r = evaluate_nelbo(model, blocks, batch_size=args.eval_batch, seed=args.seed, device=device,
                           max_batches=args.max_batches, progress=not args.no_progress)
        result.update(dataset=args.dataset, length=length, **r)
        print(f"{args.dataset}: NELBO {r['nelbo']:.4f} nats/token, perplexity <= {r['ppl']:.2f} "
              f"({r['tokens']:,} tokens, {r['batches']} batches of {args.eval_batch})")
    if args.gen_ppl_model:
        if args.samples:
            rows = [json.loads(x) for x in Path(args.samples).read_text().splitlines() if x.strip()]
        else:
            if tokenizer is None:
                raise SystemExit("duo-fast eval: decoding samples needs a tokenizer (--tokenizer)")
            rows, st = _sample_rows(args, model, tokenizer, device)
            _print_throughput(st)
        texts = [r["text"] for r in rows]
        if any(t is None for t in texts):
            raise SystemExit("duo-fast eval: the samples have no text to score")
        g = generative_perplexity(texts, args.gen_ppl_model, device=device)
        ent = unigram_entropy([r["token_ids"] for r in rows])
        result.update(gen_ppl_model=args.gen_ppl_model, num_samples=len(rows), unigram_entropy=ent, **g)
        print(f"generative perplexity under {args.gen_ppl_model}: {g['gen_ppl']:.2f} ({g['tokens']:,} tokens, "
              f"{len(rows)} samples); unigram entropy {ent:.3f} nats")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench.suite import GROUPS, print_suite, run_suite
    from .train import resolve_device

    device = resolve_device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    groups = list(GROUPS) if args.what == "all" else [args.what]
    res = run_suite(groups, args.preset, device, dtype, args.batch, args.length, args.repeats,
                    progress=not args.no_progress)
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
    args = build_parser().parse_args(argv)
    return {"train": _cmd_train, "distill": _cmd_distill, "sample": _cmd_sample, "eval": _cmd_eval, "bench": _cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
