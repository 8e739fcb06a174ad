"""The public trainer's PyTorch Lightning ``.ckpt`` files, read with no conversion and no code
from the file: ``state_dict`` (``backbone.*``; other prefixes such as ``teacher.`` ignored),
``ema.shadow_params`` (a list in the order of the backbone's parameters, buffers left out) and
the pickled metadata (the run's config, its tokenizer) read as plain data by ``io.safe_pickle``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from duo_fast.io.state_dict import PREFIX, CheckpointError, config_from_state_dict, load_pickle_checkpoint, strip_prefix
from duo_fast.model import DiT, DiTConfig

__all__ = ["read_lightning_ckpt", "lightning_metadata", "tokenizer_from_record", "check_duo", "check_sizes",
           "DUO_ALGOS"]


# algo.name values of the public code whose checkpoints are Duo denoisers (uniform-state, mean
# parameterisation, time-conditioned): trained, base, distilled (DCD) and OT-finetuned
DUO_ALGOS = ("duo", "duo_base", "distillation", "ot-finetune")


def lightning_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    """What a public Lightning checkpoint says about its model, as plain data: ``config`` (the
    run's OmegaConf config as a dict, or {}), ``algo``, ``parameterization``, ``length``,
    ``model`` (the ``model`` section) and ``tokenizer`` (its plain record, or None)."""
    from duo_fast.io.safe_pickle import to_plain

    hp = to_plain(obj.get("hyper_parameters"))
    if isinstance(hp, dict) and "__class__" in hp:          # a dict subclass (Lightning's AttributeDict)
        hp = hp.get("items") or hp.get("state") or {}
    hp = hp if isinstance(hp, dict) else {}
    config = hp.get("config") if isinstance(hp.get("config"), dict) else {}
    algo = config.get("algo") if isinstance(config.get("algo"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    length = model.get("length")
    return {"config": config, "algo": algo.get("name"), "parameterization": algo.get("parameterization"),
            "time_conditioning": algo.get("time_conditioning"), "causal_attention": algo.get("causal_attention"),
            "length": length if isinstance(length, int) and not isinstance(length, bool) else None,
            "model": model, "tokenizer": hp.get("tokenizer")}


def check_duo(meta: dict[str, Any], path: Path) -> None:
    """Refuse checkpoints of other algorithms: same DiT keys, a different meaning."""
    name, param = meta["algo"], meta["parameterization"]
    if name is None:
        return
    if name not in DUO_ALGOS or param not in (None, "mean") or meta["causal_attention"] or \
            meta["time_conditioning"] is False:
        what = {"mdlm": "an MDLM (masked diffusion)", "sedd": "a SEDD (score entropy)", "d3pm": "a D3PM",
                "ar": "an autoregressive"}.get(name, f"an algo.name={name!r}")
        raise CheckpointError(f"{path} is {what} checkpoint (algo.name={name!r}, parameterization={param!r}); "
                              f"duo_fast loads Duo models only (algo.name in {', '.join(DUO_ALGOS)})")


def tokenizer_from_record(record: Any) -> Any:
    """A ``transformers`` fast tokenizer rebuilt from the plain record of a pickled one (its
    ``tokenizers`` JSON and special tokens: data only, nothing of the pickle runs), or None."""
    if not isinstance(record, dict):
        return None
    state = record.get("state") if isinstance(record.get("state"), dict) else {}
    inner = state.get("_tokenizer")
    raw = inner.get("state") if isinstance(inner, dict) else None
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", errors="strict")
    if not isinstance(raw, str):
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        backend = Tokenizer.from_str(raw)
    except Exception:  # noqa: BLE001 - not a tokenizers JSON: no tokenizer
        return None

    def token(v: Any) -> str | None:
        if isinstance(v, str):
            return v
        if isinstance(v, dict):                          # an AddedToken record
            st = v.get("state") if isinstance(v.get("state"), dict) else {}
            content = st.get("content")
            if content is None and v.get("args"):
                content = v["args"][0]
            return content if isinstance(content, str) else None
        return None

    specials = {}
    for src in (state.get("init_kwargs"), state.get("_special_tokens_map")):
        if isinstance(src, dict):
            for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
                if token(src.get(k)) is not None:
                    specials[k] = token(src[k])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tok.name_or_path = state.get("name_or_path") or ""
    return tok


def read_lightning_ckpt(path: Path, ema: bool = True,
                        trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, list[str], str]:
    """(state dict without the prefix, config overrides with ``_lightning`` metadata and ``_ema``,
    format, notes, weights used: ``ema`` or ``raw``) of a public Lightning ``.ckpt``."""
    obj, notes = load_pickle_checkpoint(path, trust)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' dict)")
    sd = strip_prefix(obj["state_dict"])
    others = sorted({k.split(".", 1)[0] for k in obj["state_dict"] if not k.startswith(PREFIX)})
    if others:
        notes.append(f"ignored state_dict prefixes: {', '.join(others)}")
    meta = lightning_metadata(obj)
    check_duo(meta, path)
    base: dict[str, Any] = {}
    if meta["length"]:
        base["model_length"] = meta["length"]
    if meta["algo"]:
        notes.append(f"algo {meta['algo']} ({meta['parameterization']}), model {meta['model'].get('name', '?')}")
    base["_lightning"] = meta
    weights = "raw"
    e = obj.get("ema")
    shadow = e.get("shadow_params") if isinstance(e, dict) else None
    if shadow is not None:
        with torch.device("meta"):
            model = DiT(config_from_state_dict(sd, {k: v for k, v in base.items() if k != "_lightning"}))
        names = [n for n, _ in model.named_parameters()]
        if len(shadow) < len(names):
            raise CheckpointError(f"{path}: the EMA has {len(shadow)} tensors, the denoiser {len(names)} parameters")
        if len(shadow) > len(names):
            notes.append(f"EMA has {len(shadow) - len(names)} trailing tensors beyond the backbone's; ignored")
        for n, t in zip(names, shadow):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(sd[n].shape):
                raise CheckpointError(f"{path}: EMA tensor for {n} has shape "
                                      f"{getattr(t, 'shape', None)}, the weight {tuple(sd[n].shape)}")
        decay, updates = e.get("decay"), e.get("num_updates")
        base["_ema"] = {"decay": float(decay) if isinstance(decay, (int, float)) else None,
                        "num_updates": int(updates) if isinstance(updates, int) else None,
                        "shadow": dict(zip(names, shadow))}
    if ema:
        if shadow is None:
            notes.append("no EMA in the checkpoint; using the raw weights")
        else:
            sd.update(base["_ema"]["shadow"])
            weights = "ema"
    return sd, base, "lightning", notes, weights


def check_sizes(config: DiTConfig, model_section: dict[str, Any], source: str) -> None:
    """The pickled config's model sizes must be those of the weights."""
    pairs = (("hidden_size", config.hidden_dim), ("n_blocks", config.n_blocks), ("n_heads", config.n_heads),
             ("cond_dim", config.cond_dim))
    for key, have in pairs:
        want = model_section.get(key)
        if isinstance(want, int) and want != have:
            raise CheckpointError(f"{source}: the pickled config says model.{key} = {want}, the weights {have}")
