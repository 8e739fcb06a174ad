"""Load existing Duo checkpoints with no conversion step and no remote code (duo-math.md section 7).

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

from .checkpoint import PREFIX
from .model import PRESETS, DiT, DiTConfig

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


# ---------------------------------------------------------------------------------------------
# Pickles
# ---------------------------------------------------------------------------------------------

class _Dropped:
    """Stands in for any object of a class the restricted unpickler does not trust. It keeps
    the object's unpickled arguments and state (already plain data), never its behaviour."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Dropped":
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<dropped>"


_SAFE = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("builtins", "complex"), ("torch", "Size"), ("torch", "device"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch.nn.parameter", "Parameter"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
}


# Globals from these modules can run code when called during unpickling: refused outright.
_FORBIDDEN_ROOTS = {"builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "socket", "shutil",
                    "importlib", "runpy", "pickle", "marshal", "code", "codeop", "ctypes", "types", "functools",
                    "operator", "io", "pathlib", "tempfile", "webbrowser", "pty", "signal", "multiprocessing",
                    "threading", "asyncio", "torch", "numpy", "dill", "cloudpickle", "pydoc", "inspect"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding functions, dtypes and plain containers. Globals of
    modules that can run code (``os.system``, ``builtins.eval``, any other ``torch.*``) are an
    error; classes of other modules (Lightning/Hydra metadata) become :class:`_Dropped`, so no
    code of the checkpoint's classes ever runs."""

    dropped: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage"):
            return super().find_class(module, name)
        if module.split(".")[0] in _FORBIDDEN_ROOTS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in the pickle "
                                         "(pass --trust-checkpoint / trust_checkpoint=True only if you trust the file)")
        _RestrictedUnpickler.dropped.add(f"{module}.{name}")
        return _Dropped


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` and ``load``."""

    Unpickler = _RestrictedUnpickler
    __name__ = "duo_fast_restricted_pickle"

    @staticmethod
    def load(f: Any, **kw: Any) -> Any:
        return _RestrictedUnpickler(f, **kw).load()


def load_pickle_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> tuple[Any, list[str]]:
    """``torch.load`` a pickle safely. Returns ``(object, notes)``: tries ``weights_only=True``,
    then (for metadata classes) the restricted unpickler; ``trust_checkpoint=True`` allows
    arbitrary code, as plain ``torch.load`` would."""
    path = Path(path)
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False), ["loaded with arbitrary unpickling (trusted)"]
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as e:
        first_error = e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    _RestrictedUnpickler.dropped = set()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except pickle.UnpicklingError as e:
        if str(e).startswith("forbidden global"):
            raise CheckpointError(f"{path}: {e}") from e
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from e
    except Exception as e:  # noqa: BLE001 - any other failure here is a corrupt file
        raise CheckpointError(f"{path} could not be read even with the restricted unpickler ({e}); "
                              f"weights_only said: {first_error}") from e
    dropped = sorted(_RestrictedUnpickler.dropped)
    return obj, [f"restricted unpickler dropped objects of: {', '.join(dropped)}"] if dropped else []


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


def _plain(x: Any) -> Any:
    """Unwrap dropped objects to their state; OmegaConf-style nodes to their content/value."""
    while isinstance(x, _Dropped):
        x = x.state if x.state is not None else (x.args[0] if x.args else None)
        if isinstance(x, dict) and ("_content" in x or "_val" in x):
            x = x.get("_content", x.get("_val"))
    return x


def _lightning_length(obj: Any, depth: int = 0) -> int | None:
    """The training length (``model.length`` of the run's config) anywhere in the metadata."""
    x = _plain(obj)
    if depth > 12:
        return None
    if isinstance(x, dict):
        model = _plain(x.get("model"))
        if isinstance(model, dict) and isinstance(_plain(model.get("length")), int):
            return int(_plain(model["length"]))
        values = x.values()
    elif isinstance(x, (list, tuple)):
        values = x
    else:
        return None
    for v in values:
        if (found := _lightning_length(v, depth + 1)) is not None:
            return found
    return None


def _from_lightning(path: Path, ema: bool, trust: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, list[str], str]:
    obj, notes = load_pickle_checkpoint(path, trust)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' dict)")
    sd = _strip(obj["state_dict"])
    others = sorted({k.split(".", 1)[0] for k in obj["state_dict"] if not k.startswith(PREFIX)})
    if others:
        notes.append(f"ignored state_dict prefixes: {', '.join(others)}")
    base: dict[str, Any] = {}
    length = _lightning_length(obj.get("hyper_parameters"))
    if length:
        base["model_length"] = length
    weights = "raw"
    if ema:
        e = obj.get("ema")
        shadow = e.get("shadow_params") if isinstance(e, dict) else None
        if shadow is None:
            notes.append("no EMA in the checkpoint; using the raw weights")
        else:
            model = DiT(config_from_state_dict(sd, base))
            names = [n for n, _ in model.named_parameters()]
            if len(shadow) < len(names):
                raise CheckpointError(f"{path}: the EMA has {len(shadow)} tensors, the denoiser {len(names)} parameters")
            if len(shadow) > len(names):
                notes.append(f"EMA has {len(shadow) - len(names)} trailing tensors beyond the backbone's; ignored")
            for n, t in zip(names, shadow):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(sd[n].shape):
                    raise CheckpointError(f"{path}: EMA tensor for {n} has shape "
                                          f"{getattr(t, 'shape', None)}, the weight {tuple(sd[n].shape)}")
                sd[n] = t
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
    config = config_from_state_dict(sd, cfg)
    with torch.device("meta"):
        model = DiT(config)
    model = model.to_empty(device="cpu")
    _check_and_load(model, sd, src)
    model = model.to(device=device, dtype=dtype).eval() if dtype is not None else model.to(device).eval()
    info = PretrainedInfo(source=src, format=fmt, vocab_size=config.vocab_size, length=config.model_length,
                          preset=preset_name(config), weights=weights, config=config.to_dict(),
                          extra=dict(cfg.get("duo_fast") or {}), notes=notes)
    return model, info


def describe(info: PretrainedInfo) -> str:
    return (f"{info.source}: {info.format}, {info.preset} (K={info.vocab_size}, L={info.length}), "
            f"{info.weights} weights" + (f"; {'; '.join(info.notes)}" if info.notes else ""))
