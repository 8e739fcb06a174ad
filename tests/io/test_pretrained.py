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
from public_files import hf_config, public_tokenizer, random_weights, write_hf, write_lightning

from duo_fast import reference as ref
from duo_fast.cli import main
from duo_fast.data import get_tokenizer
from duo_fast.data.eval_sets import eval_blocks
from duo_fast.eval.gen_ppl import unigram_entropy
from duo_fast.eval.nelbo import discrete_nelbo_draws, evaluate_nelbo
from duo_fast.io.pretrained import CheckpointError, load_pretrained
from duo_fast.model import DiT, DiTConfig


def _direct_model(sd, preset, K):
    m = DiT(DiTConfig.from_name(preset, vocab_size=K, model_length=64))
    m.load_state_dict(sd)
    return m.eval()


@pytest.mark.parametrize("preset,K", [("tiny", 1000), ("small", 50257)])
def test_both_public_layouts_load_exactly(tmp_path, preset, K):
    raw = random_weights(preset, K)
    ema = {k: (v * 0.5 if v.is_floating_point() and k != "rotary_emb.inv_freq" else v) for k, v in raw.items()}
    ids, sigma = torch.randint(0, K, (1, 16)), torch.tensor([1.3])

    model, info = load_pretrained(write_hf(tmp_path / "hf", ema, hf_config(preset, K)))
    assert (info.format, info.preset, info.vocab_size, info.weights) == ("hf-safetensors", preset, K, "ema")
    assert_close(model(ids, sigma), _direct_model(ema, preset, K)(ids, sigma), atol=1e-6, rtol=1e-6, what="hf")
    del model

    lt = write_lightning(tmp_path / "last.ckpt", raw, ema, length=128, preset=preset)
    model, info = load_pretrained(lt)                                    # EMA by default, no trust flag
    assert info.weights == "ema" and info.length == 128 and any("teacher" in n for n in info.notes)
    assert info.algo == "duo" and any("omegaconf.dictconfig.DictConfig" in n for n in info.notes)
    assert_close(model(ids, sigma), _direct_model(ema, preset, K)(ids, sigma), atol=1e-6, rtol=1e-6, what="ema")
    raw_model, info = load_pretrained(lt, ema=False)
    assert info.weights == "raw"
    assert_close(raw_model(ids, sigma), _direct_model(raw, preset, K)(ids, sigma), atol=1e-6, rtol=1e-6, what="raw")
    assert not torch.allclose(raw_model(ids, sigma), model(ids, sigma))


def test_pytorch_model_bin_and_dtype(tmp_path):
    sd = random_weights("tiny", 300)
    model, info = load_pretrained(write_hf(tmp_path / "bin", sd, hf_config("tiny", 300), fmt="bin"),
                                  dtype=torch.float64)
    assert info.format == "hf-bin" and model.vocab_embed.embedding.dtype == torch.float64


def test_corrupt_and_wrong_inputs(tmp_path):
    sd = random_weights("tiny", 300)
    cfg = hf_config("tiny", 300)
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


class Exploit:
    """A reduce that would create a marker file if anything ever called it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_public_lightning_checkpoint_loads_as_written(tmp_path):
    """A .ckpt laid out exactly as the public trainer writes one (pickled DictConfig with
    model.length = 128, pickled BertTokenizerFast, EMA dict, loops, callbacks, optimizer states)
    loads with no flag and no omegaconf import on the loading side, reports length 128, and gives
    the public DiT's logits with the EMA weights (the written-out forward of test_model)."""
    import subprocess
    import sys

    from dit_oracle import manual_forward

    raw = random_weights("tiny", 10)
    ema = {k: (v * 0.7 + 0.01 if v.is_floating_point() and k != "rotary_emb.inv_freq" else v) for k, v in raw.items()}
    path = write_lightning(tmp_path / "last.ckpt", raw, ema, length=128, tokenizer=public_tokenizer(tmp_path))
    model, info = load_pretrained(path)
    assert (info.format, info.length, info.weights, info.algo, info.vocab_size) == ("lightning", 128, "ema", "duo", 10)
    ids, sigma = torch.randint(0, 10, (2, 128)), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        got = model(ids, sigma)
        want = manual_forward(_direct_model(ema, "tiny", 10).double(), ids, sigma.double())
    assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5, what="EMA logits")
    # the pickled tokenizer is rebuilt from its data: the same ids as the original object
    tok = info.tokenizer
    assert tok is not None and len(tok) == 10
    assert tok("the cat sat on the mat")["input_ids"] == public_tokenizer()("the cat sat on the mat")["input_ids"]
    # loading imports nothing of the pickle's classes (a fresh interpreter, omegaconf blocked)
    code = ("import sys; sys.modules['omegaconf'] = None; sys.modules['lightning'] = None\n"
            "from duo_fast.io.pretrained import load_pretrained\n"
            f"m, i = load_pretrained({str(path)!r}); assert i.length == 128, i\n"
            "assert 'omegaconf.dictconfig' not in sys.modules and 'transformers.models.bert' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    sd = random_weights("tiny", 300)
    marker = tmp_path / "pwned"
    path = write_lightning(tmp_path / "evil.ckpt", sd, sd, callbacks_extra={"Evil": {"state": Exploit(marker)}})
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="forbidden global (posix|os).system"):
        load_pretrained(path)
    with pytest.raises(SystemExit, match="forbidden global"):
        main(["sample", "--checkpoint", str(path), "--steps", "1", "--batch", "1"])
    assert not marker.exists(), "the checkpoint's code ran"
    for hostile in [(eval, ("1",)), (getattr, ("text", "upper")), (__import__, ("os",))]:
        class Hostile:
            def __reduce__(self, h=hostile):
                return h
        bad = write_lightning(tmp_path / "h.ckpt", sd, sd, callbacks_extra={"H": Hostile()})
        with pytest.raises(CheckpointError, match=r"forbidden global (__builtin__|builtins)\.(eval|getattr|__import__)"):
            load_pretrained(bad)
    model, info = load_pretrained(path, trust_checkpoint=True)            # explicit trust: plain torch.load
    assert "trusted" in info.notes[0] and marker.exists()


@pytest.mark.parametrize("algo,param", [("mdlm", "subs"), ("sedd", "score"), ("d3pm", "mean"), ("ar", "ar")])
def test_other_algorithms_are_refused_by_name(tmp_path, algo, param):
    sd = random_weights("tiny", 300)
    path = write_lightning(tmp_path / f"{algo}.ckpt", sd, sd, algo=algo, parameterization=param)
    with pytest.raises(CheckpointError, match=f"algo.name='{algo}'.*Duo models only"):
        load_pretrained(path)


def test_distilled_and_base_duo_checkpoints_load(tmp_path):
    sd = random_weights("tiny", 300)
    for algo in ("duo_base", "distillation"):
        model, info = load_pretrained(write_lightning(tmp_path / f"{algo}.ckpt", sd, sd, algo=algo))
        assert info.algo == algo


def test_weights_only_refuses_the_metadata_the_safe_reader_accepts(tmp_path):
    sd = random_weights("tiny", 300)
    path = write_lightning(tmp_path / "m.ckpt", sd, sd)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)                               # the metadata classes are not allowed
    model, info = load_pretrained(path)
    assert info.weights == "ema"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny model with the bundled tokenizer's vocabulary, exported in the HF layout."""
    from duo_fast.io.hf_folder import save_hf_folder

    tok = get_tokenizer("bundled", 512)
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name("tiny", vocab_size=len(tok), model_length=32, n_blocks=2))
    with torch.no_grad():
        for p in model.parameters():
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


def test_sample_from_a_public_ckpt_uses_its_pickled_tokenizer(tmp_path, capsys):
    """`duo-fast sample --checkpoint last.ckpt`: no flag, the tokenizer saved in the file, and
    the timing line with the graph-capture seconds and the wall time."""
    raw = random_weights("tiny", 10)
    path = write_lightning(tmp_path / "last.ckpt", raw, raw, length=16, tokenizer=public_tokenizer(tmp_path))
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--checkpoint", str(path), "--steps", "2", "--batch", "2", "--no-progress",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tokenizer: the one saved in the checkpoint" in text
    assert "CUDA-graph capture" in text and "wall time" in text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["token_ids"]) == 16 and isinstance(r["text"], str) for r in rows)


def test_gen_ppl_follows_the_public_protocol(tiny_export, tmp_path):
    """The public rule, written out position by position: texts decoded with their special
    tokens, the scorer's tokenizer padding with EOS, truncation to the sample length, batches of
    2 with the last partial batch dropped, and a target counted when it is not EOS or is its
    row's first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from duo_fast.eval.gen_ppl import generative_perplexity

    _, tok = tiny_export
    lm_dir = tmp_path / "lm"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    eos = tok.eos_token
    texts = [f"the cat sat{eos} on the mat{eos}{eos}", "a short one", f"{eos}{eos} starts with two end tokens and goes on",
             "a text long enough to be truncated at twelve tokens by the scorer's tokenizer, surely", "dropped"]
    got = generative_perplexity(texts, str(lm_dir), max_length=12, batch_size=2)

    scorer_tok, lm = AutoTokenizer.from_pretrained(lm_dir), AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    if scorer_tok.pad_token is None:
        scorer_tok.pad_token = scorer_tok.eos_token
    eos_id = scorer_tok.eos_token_id
    nll, count, targets = 0.0, 0, 0
    for b in range(len(texts) // 2):                         # 2 batches: the fifth text is not scored
        enc = scorer_tok(texts[2 * b:2 * b + 2], return_tensors="pt", truncation=True, padding=True, max_length=12)
        with torch.no_grad():
            logp = lm(enc["input_ids"], attention_mask=enc["attention_mask"]).logits.double().log_softmax(-1)
        for i, row in enumerate(enc["input_ids"].tolist()):
            assert len(row) <= 12
            first = row.index(eos_id) if eos_id in row else None
            for k in range(1, len(row)):
                targets += 1
                if row[k] != eos_id or k == first:
                    nll -= float(logp[i, k - 1, row[k]])
                    count += 1
    assert count < targets, "the texts must contain EOS tokens that do not count"
    assert got["samples_scored"] == 4 and got["tokens"] == count
    assert got["gen_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    full = generative_perplexity(texts, str(lm_dir), protocol="full")
    assert full["samples_scored"] == 5 and full["tokens"] > count
