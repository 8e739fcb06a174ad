"""Test helpers: checkpoint files written the way the public code writes them (HF folders,
Lightning ``.ckpt`` files with their pickled config and tokenizer), and random weights for them."""

from __future__ import annotations

import json
import os

import torch

from duo_fast.io.pretrained import config_from_state_dict
from duo_fast.model import DiT, DiTConfig


def random_weights(preset: str, K: int) -> dict[str, torch.Tensor]:
    cfg = DiTConfig.from_name(preset, vocab_size=K, model_length=64)
    model = DiT(cfg)
    g = torch.Generator().manual_seed(hash(preset) % 1000)
    return {k: (torch.randn(v.shape, generator=g) * 0.02 if k != "rotary_emb.inv_freq" else v)
            for k, v in model.state_dict().items()}


def hf_config(preset: str, K: int) -> dict:
    d = DiTConfig.from_name(preset, vocab_size=K, model_length=64).to_dict()
    return {"architectures": ["DIT"], "model_type": "dit", **d}


def write_hf(folder, sd, cfg, fmt="safetensors"):
    os.makedirs(folder, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = {"backbone." + k: v.contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(folder / "model.safetensors"))
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    return folder


def public_tokenizer(folder=None) -> object:
    """A ``BertTokenizerFast`` as the public LM1B runs pickle it (a small local vocabulary)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert len(tok) == 10
    return tok


def public_config(length: int, preset: str = "tiny", algo: str = "duo", parameterization: str = "mean"):
    """The run's OmegaConf config as the public trainer's ``save_hyperparameters()`` pickles it."""
    import omegaconf

    sizes = {"tiny": (256, 8, 8), "small": (768, 12, 12)}[preset]
    return omegaconf.OmegaConf.create({
        "mode": "train", "seed": 1,
        "model": {"name": preset, "type": "ddit", "hidden_size": sizes[0], "cond_dim": 128, "length": length,
                  "n_blocks": sizes[1], "n_heads": sizes[2], "scale_by_sigma": True, "dropout": 0.1,
                  "tie_word_embeddings": False, "vocab_lookup": True},
        "algo": {"name": algo, "backbone": "dit", "parameterization": parameterization,
                 "time_conditioning": algo != "mdlm", "T": 0, "subs_masking": False, "causal_attention": False,
                 "curriculum": {"mode": "simple", "gamma_min": -3.5, "gamma_max": -1.75}},
        "data": {"train": "lm1b-wrap", "tokenizer_name_or_path": "bert-base-uncased", "wrap": True},
        "training": {"ema": 0.9999, "antithetic_sampling": True, "sampling_eps": 1e-3},
        "sampling": {"predictor": "ancestral", "steps": 1000, "noise_removal": "ancestral",
                     "psi": {"high_mode": "pure-posterior", "high_frac": 0.2}},
        "trainer": {"max_steps": 1000000, "precision": "bf16", "devices": "${eval:1}"},
    })


def write_lightning(path, raw, ema_sd, length=64, preset="tiny", algo="duo", parameterization="mean",
                    tokenizer=None, callbacks_extra=None):
    """A checkpoint laid out as the public Lightning trainer writes one: ``state_dict`` with
    ``backbone.*`` (and a DCD ``teacher.*``), ``ema`` (decay, num_updates, shadow_params in the
    backbone's parameter order), ``hyper_parameters`` = {config: DictConfig, tokenizer: object},
    loops, callbacks, optimizer and scheduler states."""
    with torch.device("meta"):
        model = DiT(config_from_state_dict(raw))                   # the parameter order of this backbone
    order = [n for n, _ in model.named_parameters()]
    state = {"backbone." + k: v for k, v in raw.items()}
    state.update({"teacher." + k: v + 1 for k, v in list(raw.items())[:3]})
    callbacks = {"ModelCheckpoint{'monitor': 'val/nll', 'mode': 'min', 'every_n_train_steps': 500}": {
        "monitor": "val/nll", "best_model_score": torch.tensor(3.1), "best_model_path": "/ckpt/best.ckpt",
        "current_score": torch.tensor(3.2), "dirpath": "/ckpt", "best_k_models": {"/ckpt/best.ckpt": torch.tensor(3.1)},
        "kth_best_model_path": "/ckpt/best.ckpt", "kth_value": torch.tensor(3.1), "last_model_path": "/ckpt/last.ckpt"}}
    callbacks.update(callbacks_extra or {})
    first = order[0]
    ck = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.5.0", "state_dict": state,
          "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}},
                                 "epoch_loop.state_dict": {"_batches_that_stepped": 1000}}},
          "callbacks": callbacks,
          "optimizer_states": [{"state": {0: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(raw[first]),
                                              "exp_avg_sq": torch.zeros_like(raw[first])}},
                                "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                                                  "amsgrad": False, "params": [0], "initial_lr": 3e-4}]}],
          "lr_schedulers": [{"base_lrs": [3e-4], "last_epoch": 1000, "_step_count": 1001, "lr_lambdas": [None]}],
          "hparams_name": "kwargs",
          "hyper_parameters": {"config": public_config(length, preset, algo, parameterization), "tokenizer": tokenizer},
          "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": [ema_sd[n] for n in order]}}
    torch.save(ck, path)
    return path
