"""Load existing Duo checkpoints with no conversion step and no remote code (docs/math.md section 7).

``load_pretrained(path_or_hub_id)`` reads:

* a Hugging Face folder: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``), keys
  ``backbone.`` + the denoiser's names (the public ``s-sahoo/duo*`` repositories, and the
  ``export/`` folder of ``duo-fast train``);
* a hub id, fetched with ``huggingface_hub.snapshot_download`` where the network allows;
* a PyTorch Lightning ``.ckpt`` of the public training code: ``state_dict`` (``backbone.*``, other
  prefixes such as ``teacher.`` ignored) and ``ema.shadow_params``, a list in the order of the
  backbone's parameters (buffers left out), used by default.

Pickles (``.ckpt``, ``.bin``) are read with ``torch.load(weights_only=True)``. A Lightning
checkpoint whose metadata holds other classes is read by a restricted unpickler that keeps
tensors and plain containers and drops everything else; arbitrary unpickling needs
``trust_checkpoint=True``.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from duo_fast.io.hf_folder import PREFIX
from duo_fast.model import PRESETS, DiT, DiTConfig

__all__ = ["load_pretrained", "PretrainedInfo", "CheckpointError", "load_pickle_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason."""


@dataclass
class PretrainedInfo:
    source: str
    format: str                      # "hf-safetensors", "hf-bin", "lightning"
    vocab_size: int
    length: int
    preset: str                      # tiny / small / medium, or "custom"
    weights: str                     # "ema" or "raw"
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)      # config.json's "duo_fast" entry (tokenizer, step)
    notes: list[str] = field(default_factory=list)
    algo: str | None = None          # a Lightning checkpoint's algo.name (duo, duo_base, distillation, ...)
    tokenizer: Any = None            # the tokenizer pickled in a Lightning checkpoint, rebuilt as data
    # a Lightning checkpoint's EMA: {"decay", "num_updates", "shadow": {parameter name: tensor (CPU)}}
    ema_state: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Pickles
# ---------------------------------------------------------------------------------------------

def load_pickle_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> tuple[Any, list[str]]:
    """``torch.load`` a pickle without running code from it. Returns ``(object, notes)``: tries
    ``weights_only=True``, then :mod:`duo_fast.safe_pickle` (objects of other classes, such as
    the OmegaConf config and tokenizer of a Lightning checkpoint, become inert records);
    ``trust_checkpoint=True`` allows arbitrary code, as plain ``torch.load`` would."""
    from duo_fast.io import safe_pickle

    path = Path(path)
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False), ["loaded with arbitrary unpickling (trusted)"]
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as e:
        first_error = e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    try:
        obj, classes = safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as e:
        raise CheckpointError(f"{path}: {e}; pass --trust-checkpoint / trust_checkpoint=True only if you trust "
                              "the file") from e
    except Exception as e:  # noqa: BLE001 - any other failure here is a corrupt file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
                              f"weights_only said: {first_error}") from e
    return obj, [f"metadata objects read as inert records: {', '.join(classes)}"] if classes else []


# ---------------------------------------------------------------------------------------------
# Configs from weights
# ---------------------------------------------------------------------------------------------

def config_from_state_dict(sd: dict[str, torch.Tensor], base: dict[str, Any] | None = None) -> DiTConfig:
    """The denoiser's sizes from the weights (vocabulary, width, depth, heads via the rotary
    table, conditioning width); ``base`` (a config.json dict) supplies length, dropout, etc."""
    if "vocab_embed.embedding" not in sd:
        raise CheckpointError(f"no '{PREFIX}vocab_embed.embedding' in the weights; is this a Duo/MDLM DiT checkpoint?")
    K, D = sd["vocab_embed.embedding"].shape
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    cfg = dict(base or {})
    cfg.update(vocab_size=int(K), hidden_dim=int(D), n_blocks=len(blocks))
    if "sigma_map.mlp.0.weight" in sd:
        cfg["cond_dim"] = int(sd["sigma_map.mlp.0.weight"].shape[0])
    if "rotary_emb.inv_freq" in sd:
        cfg["n_heads"] = int(D // (2 * sd["rotary_emb.inv_freq"].shape[0]))
    elif "n_heads" not in cfg:
        raise CheckpointError("cannot tell the number of heads: no rotary_emb.inv_freq and no config")
    try:
        return DiTConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"inconsistent model sizes {cfg}: {e}") from e


def preset_name(cfg: DiTConfig) -> str:
    for name, p in PRESETS.items():
        if all(getattr(cfg, k) == v for k, v in p.items()):
            return name
    return "custom"


def _check_and_load(model: DiT, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the denoiser; missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: '{PREFIX}{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True)


def _strip(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX) and isinstance(v, torch.Tensor)}


def _from_hf_folder(path: Path, trust: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, list[str]]:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from e
    st, binf = path / "model.safetensors", path / "pytorch_model.bin"
    if st.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        return _strip(tensors), cfg, "hf-safetensors", []
    if binf.exists():
        obj, notes = load_pickle_checkpoint(binf, trust)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{binf} does not hold a state dict")
        return _strip(obj), cfg, "hf-bin", notes
    raise CheckpointError(f"{path} has neither model.safetensors nor pytorch_model.bin")


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


def _check_duo(meta: dict[str, Any], path: Path) -> None:
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


def _from_lightning(path: Path, ema: bool, trust: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, list[str], str]:
    obj, notes = load_pickle_checkpoint(path, trust)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' dict)")
    sd = _strip(obj["state_dict"])
    others = sorted({k.split(".", 1)[0] for k in obj["state_dict"] if not k.startswith(PREFIX)})
    if others:
        notes.append(f"ignored state_dict prefixes: {', '.join(others)}")
    meta = lightning_metadata(obj)
    _check_duo(meta, path)
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


def load_pretrained(path_or_hub_id: str | Path, ema: bool = True, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, trust_checkpoint: bool = False) -> tuple[DiT, PretrainedInfo]:
    """Load a Duo denoiser from a HF folder, a hub id or a Lightning ``.ckpt``.

    Returns ``(model in eval mode on device, info)``. ``ema=False`` takes the raw weights of a
    Lightning checkpoint (HF folders hold one set of weights). ``dtype`` casts the floating
    parameters (default: keep float32, as the public model, with bf16 autocast on CUDA).
    """
    src = str(path_or_hub_id)
    path = Path(src)
    notes: list[str] = []
    if path.is_dir():
        sd, cfg, fmt, notes = _from_hf_folder(path, trust_checkpoint)
        weights = "ema" if cfg.get("duo_fast", {}).get("weights", "ema") == "ema" else "raw"
    elif path.is_file():
        sd, cfg, fmt, notes, weights = _from_lightning(path, ema, trust_checkpoint)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(src, allow_patterns=["config.json", "*.safetensors", "*.bin", "tokenizer*"])
        except Exception as e:  # noqa: BLE001 - offline, missing repo, ...
            raise CheckpointError(f"could not fetch {src!r} from the Hugging Face hub ({type(e).__name__}: {e})") from e
        return load_pretrained(local, ema=ema, device=device, dtype=dtype, trust_checkpoint=trust_checkpoint)
    else:
        raise CheckpointError(f"{src!r} is neither a checkpoint folder, a .ckpt file nor a hub id")
    lightning = cfg.pop("_lightning", None) if fmt == "lightning" else None
    ema_state = cfg.pop("_ema", None) if fmt == "lightning" else None
    config = config_from_state_dict(sd, cfg)
    if lightning is not None:
        _check_sizes(config, lightning["model"], src)
    with torch.device("meta"):
        model = DiT(config)
    model = model.to_empty(device="cpu")
    _check_and_load(model, sd, src)
    model = model.to(device=device, dtype=dtype).eval() if dtype is not None else model.to(device).eval()
    info = PretrainedInfo(source=src, format=fmt, vocab_size=config.vocab_size, length=config.model_length,
                          preset=preset_name(config), weights=weights, config=config.to_dict(),
                          extra=dict(cfg.get("duo_fast") or {}), notes=notes,
                          algo=lightning["algo"] if lightning else None,
                          tokenizer=tokenizer_from_record(lightning["tokenizer"]) if lightning else None,
                          ema_state=ema_state)
    return model, info


def _check_sizes(config: DiTConfig, model_section: dict[str, Any], source: str) -> None:
    """The pickled config's model sizes must be those of the weights."""
    pairs = (("hidden_size", config.hidden_dim), ("n_blocks", config.n_blocks), ("n_heads", config.n_heads),
             ("cond_dim", config.cond_dim))
    for key, have in pairs:
        want = model_section.get(key)
        if isinstance(want, int) and want != have:
            raise CheckpointError(f"{source}: the pickled config says model.{key} = {want}, the weights {have}")


def describe(info: PretrainedInfo) -> str:
    return (f"{info.source}: {info.format}, {info.preset} (K={info.vocab_size}, L={info.length}), "
            f"{info.weights} weights" + (f"; {'; '.join(info.notes)}" if info.notes else ""))
