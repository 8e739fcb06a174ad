"""Existing checkpoints (section 7): HF folders and Lightning .ckpt files written here in the
public layouts, loaded with no conversion; errors on corrupt or hostile inputs; evaluation."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
from conftest import assert_close

from duo_fast import reference as ref
from duo_fast.cli import main
from duo_fast.data import get_tokenizer
from duo_fast.evaluate import discrete_nelbo_draws, eval_blocks, evaluate_nelbo, unigram_entropy
from duo_fast.model import DiT, DiTConfig
from duo_fast.pretrained import CheckpointError, config_from_state_dict, load_pretrained


class HydraLikeConfig:
    """Stands for the metadata classes (omegaconf, Lightning) found in public .ckpt files."""

    def __init__(self, d):
        self.d = d


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _random_weights(preset: str, K: int) -> dict[str, torch.Tensor]:
    cfg = DiTConfig.from_name(preset, vocab_size=K, model_length=64)
    model = DiT(cfg)
    g = torch.Generator().manual_seed(hash(preset) % 1000)
    return {k: (torch.randn(v.shape, generator=g) * 0.02 if k != "rotary_emb.inv_freq" else v)
            for k, v in model.state_dict().items()}


def _hf_config(preset: str, K: int) -> dict:
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


def write_lightning(path, raw, ema_sd, extra_meta=True):
    """A Lightning checkpoint: backbone + teacher keys, an EMA list in parameter order, metadata."""
    with torch.device("meta"):
        model = DiT(config_from_state_dict(raw))                   # the parameter order of this backbone
    order = [n for n, _ in model.named_parameters()]
    state = {"backbone." + k: v for k, v in raw.items()}
    state.update({"teacher." + k: v + 1 for k, v in list(raw.items())[:3]})
    ck = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.0", "state_dict": state,
          "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": [ema_sd[n] for n in order]},
          "optimizer_states": [], "lr_schedulers": []}
    if extra_meta:
        ck["hyper_parameters"] = {"config": HydraLikeConfig({"model": {"length": 64}})}
    torch.save(ck, path)
    return path


def _direct_model(sd, preset, K):
    m = DiT(DiTConfig.from_name(preset, vocab_size=K, model_length=64))
    m.load_state_dict(sd)
    return m.eval()


@pytest.mark.parametrize("preset,K", [("tiny", 1000), ("small", 50257)])
def test_both_public_layouts_load_exactly(tmp_path, preset, K):
    raw = _random_weights(preset, K)
    ema = {k: (v * 0.5 if v.is_floating_point() and k != "rotary_emb.inv_freq" else v) for k, v in raw.items()}
    ids, sigma = torch.randint(0, K, (1, 16)), torch.tensor([1.3])

    model, info = load_pretrained(write_hf(tmp_path / "hf", ema, _hf_config(preset, K)))
    assert (info.format, info.preset, info.vocab_size, info.weights) == ("hf-safetensors", preset, K, "ema")
    assert_close(model(ids, sigma), _direct_model(ema, preset, K)(ids, sigma), atol=1e-6, rtol=1e-6, what="hf")
    del model

    lt = write_lightning(tmp_path / "last.ckpt", raw, ema)
    model, info = load_pretrained(lt)                                    # EMA by default
    assert info.weights == "ema" and info.length == 64 and any("teacher" in n for n in info.notes)
    assert any("dropped" in n for n in info.notes)                       # the metadata class
    assert_close(model(ids, sigma), _direct_model(ema, preset, K)(ids, sigma), atol=1e-6, rtol=1e-6, what="ema")
    raw_model, info = load_pretrained(lt, ema=False)
    assert info.weights == "raw"
    assert_close(raw_model(ids, sigma), _direct_model(raw, preset, K)(ids, sigma), atol=1e-6, rtol=1e-6, what="raw")
    assert not torch.allclose(raw_model(ids, sigma), model(ids, sigma))


def test_pytorch_model_bin_and_dtype(tmp_path):
    sd = _random_weights("tiny", 300)
    model, info = load_pretrained(write_hf(tmp_path / "bin", sd, _hf_config("tiny", 300), fmt="bin"),
                                  dtype=torch.float64)
    assert info.format == "hf-bin" and model.vocab_embed.embedding.dtype == torch.float64


def test_corrupt_and_wrong_inputs(tmp_path):
    sd = _random_weights("tiny", 300)
    cfg = _hf_config("tiny", 300)
    good = write_hf(tmp_path / "good", sd, cfg)
    # truncated safetensors
    bad = write_hf(tmp_path / "trunc", sd, cfg)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(bad)
    # missing key
    miss = {k: v for k, v in sd.items() if k != "blocks.3.attn_out.weight"}
    with pytest.raises(CheckpointError, match="missing.*blocks.3.attn_out.weight"):
        load_pretrained(write_hf(tmp_path / "miss", miss, cfg))
    # wrong shape
    wrong = dict(sd, **{"blocks.0.mlp.0.bias": torch.zeros(7)})
    with pytest.raises(CheckpointError, match="blocks.0.mlp.0.bias.*shape"):
        load_pretrained(write_hf(tmp_path / "shape", wrong, cfg))
    # not a checkpoint at all
    with pytest.raises(CheckpointError):
        load_pretrained(tmp_path / "nothing-here")
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_pretrained(tmp_path / "junk.ckpt")
    # vocabulary that does not match the tokenizer
    with pytest.raises(SystemExit, match="vocabulary is 300"):
        main(["sample", "--checkpoint", str(good), "--tokenizer", "bundled", "--steps", "1", "--batch", "1"])


def test_forbidden_global_needs_trust(tmp_path):
    sd = _random_weights("tiny", 300)
    path = write_lightning(tmp_path / "evil.ckpt", sd, sd)
    ck = torch.load(path, weights_only=False)
    ck["hyper_parameters"] = {"callback": Exploit()}
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="forbidden global posix.system|forbidden global os.system"):
        load_pretrained(path)
    with pytest.raises(SystemExit, match="forbidden global"):
        main(["sample", "--checkpoint", str(path), "--steps", "1", "--batch", "1"])
    model, info = load_pretrained(path, trust_checkpoint=True)            # explicit trust: plain torch.load
    assert "trusted" in info.notes[0]


def test_restricted_unpickler_never_runs_metadata_code(tmp_path):
    sd = _random_weights("tiny", 300)
    path = write_lightning(tmp_path / "m.ckpt", sd, sd)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)                               # the metadata class is not allowed
    model, info = load_pretrained(path)
    assert info.weights == "ema"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny model with the bundled tokenizer's vocabulary, exported in the HF layout."""
    from duo_fast.checkpoint import save_hf_folder

    tok = get_tokenizer("bundled", 512)
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("tiny", vocab_size=len(tok), model_length=32, n_blocks=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("export") / "tiny"
    save_hf_folder(model, path, extra={"tokenizer": "bundled", "tokenizer_vocab": 512, "weights": "ema"})
    return path, tok


def test_eval_equals_the_reference_loss(tiny_export, tmp_path):
    path, tok = tiny_export
    text = tmp_path / "doc.txt"
    text.write_text("\n".join(["The hacker wrote a program that ran all night.",
                               "A kludge is a clever but inelegant fix.", "Users found the bug on Friday."] * 20))
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(path), "--dataset", f"text:{text}", "--eval-batch", "4", "--seed", "5",
                 "--no-progress", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    model, _ = load_pretrained(path)
    blocks = eval_blocks(f"text:{text}", tok, 32)
    gen = torch.Generator().manual_seed(5)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, blocks.shape[0], 4):
            x0 = blocks[i:i + 4]
            zt, a, da = discrete_nelbo_draws(x0, model.config.vocab_size, gen)
            losses = ref.rb_loss_ref(model(zt, (-a.log()).float()).double(), zt, x0, a, da)
            total, n = total + float(losses.sum()), n + losses.numel()
    assert got["tokens"] == n
    assert abs(got["ppl"] - math.exp(total / n)) <= 1e-5 * math.exp(total / n)
    assert evaluate_nelbo(model, blocks, 4, seed=5, progress=False)["ppl"] == pytest.approx(got["ppl"], rel=1e-12)


def test_gen_ppl_with_a_local_causal_lm(tiny_export, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path, tok = tiny_export
    lm_dir = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    samples = tmp_path / "s.jsonl"
    assert main(["sample", "--checkpoint", str(path), "--steps", "3", "--batch", "3", "--num-samples", "7",
                 "--out", str(samples), "--no-progress"]) == 0
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(rows) == 7 and all(len(r["token_ids"]) == 32 and r["steps"] == 3 for r in rows)
    out = tmp_path / "g.json"
    assert main(["eval", "--checkpoint", str(path), "--gen-ppl-model", str(lm_dir), "--samples", str(samples),
                 "--json", str(out), "--no-progress"]) == 0
    g = json.loads(out.read_text())
    assert g["num_samples"] == 7 and math.isfinite(g["gen_ppl"]) and g["gen_ppl"] > 1
    assert g["unigram_entropy"] == pytest.approx(unigram_entropy([r["token_ids"] for r in rows]))
    assert unigram_entropy([[1] * 10]) == 0.0 and unigram_entropy([[1, 2]]) == pytest.approx(math.log(2))
