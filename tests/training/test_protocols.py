"""The public trainer's protocols, each written out here from its definition and compared with
duo_fast: learning-rate schedules, the EMA warm-up, antithetic times over the global batch,
starting from a checkpoint, DCD's initialisation, validation during training (best weights,
W&B), the LM1B padded data and its masked loss, the recipes' start-up on local stand-ins, and
the zero-shot evaluation sets' splits and EOS rule."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from public_files import random_weights, write_lightning

from duo_fast import reference as ref
from duo_fast.data import get_tokenizer, special_ids, tokenize_documents
from duo_fast.training.duo import TrainConfig, Trainer, train
from duo_fast.training.loop_support import ema_decay
from duo_fast.training.lr_schedule import lr_multiplier


def _tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(model="tiny", tokenizer="bundled", tokenizer_vocab=512, length=32, batch_size=4, steps=4, lr=1e-3,
                warmup_steps=2, ema=0.0, dropout=0.0, curriculum_end=2, val_batches=1, progress=False, log_every=1,
                check_every=0, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


# -- learning-rate schedules ---------------------------------------------------------------------

def test_lr_schedules_are_the_public_ones():
    from transformers import get_constant_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-4)
    hf = get_constant_schedule_with_warmup(opt, num_warmup_steps=25)
    constant = lr_multiplier("constant", 3e-4, 25, 1000)
    for k in range(60):                          # update k uses the multiplier after k scheduler steps
        assert constant(k) == pytest.approx(hf.get_last_lr()[0] / 3e-4, abs=1e-12), k
        opt.step()
        hf.step()
    # the public cosine_decay_warmup (timm's cosine with a warm-up prefix, lr_init = lr_min = 1e-6)
    lr, steps, warm = 3e-4, 1000, 100
    cosine = lr_multiplier("cosine", lr, warm, steps)
    for k in (0, 1, 50, 99, 100, 101, 550, 999, 1000, 1500):
        if k < warm:
            want = 1e-6 + k * (lr - 1e-6) / warm
        elif k - warm < steps - warm:
            want = 1e-6 + 0.5 * (lr - 1e-6) * (1 + math.cos(math.pi * (k - warm) / (steps - warm)))
        else:
            want = 1e-6
        assert cosine(k) * lr == pytest.approx(want, rel=1e-12), k
    # the public LRHalveScheduler (warm-up 500, halved every 10,000)
    step = lr_multiplier("step", lr, 500, 10**6, halve_every=10_000)
    for k in (0, 250, 499, 500, 10_499, 10_500, 25_000):
        want = k / 500 if k < 500 else 0.5 ** ((k - 500) // 10_000)
        assert step(k) == want, k


def test_the_engine_steps_the_schedule_per_update(tmp_path):
    tr = Trainer(_tiny(tmp_path, lr_schedule="step", warmup_steps=2, lr_halve_every=1, steps=6))
    seen = []
    for s in range(5):
        seen.append(tr.engine.lr())
        tr.train_step(s)
    assert seen == pytest.approx([0.0, 5e-4, 1e-3, 5e-4, 2.5e-4])


# -- EMA warm-up, antithetic times ---------------------------------------------------------------

def test_ema_follows_the_public_update_with_its_warm_up(tmp_path):
    tr = Trainer(_tiny(tmp_path, ema=0.9999))
    shadow = [p.detach().clone().double() for p in tr.model.parameters()]
    for s in range(3):
        tr.train_step(s)
        decay = min(0.9999, (1 + (s + 1)) / (10 + (s + 1)))          # the public ExponentialMovingAverage.update
        for sh, p in zip(shadow, tr.model.parameters()):
            sh.sub_((1.0 - decay) * (sh - p.detach().double()))
    for sh, e in zip(shadow, tr.ema):
        assert torch.allclose(sh.float(), e, atol=1e-6)
    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11) and ema_decay(0.9999, 10**6) == 0.9999


def test_times_are_stratified_over_the_global_batch(tmp_path):
    """batch 8 as 2 accumulated micro-batches of 4: micro-batch j draws strata 4j .. 4j + 3 of 8,
    each with its own uniform, as the public _sample_t chunks its global draw."""
    tr = Trainer(_tiny(tmp_path, batch_size=8, micro_batch_size=4, curriculum_end=0))
    x0 = tr.val_blocks[0:4].to(tr.device)
    for slot in (0, 1):
        tr.gen.manual_seed(11 + slot)
        alpha = tr.draw_inputs(x0, 5, True, 0, slot)["alpha"]
        t = (1 - alpha) / (1 - 1e-3)                                  # log-linear schedule inverted
        strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor()
        assert strata.tolist() == [4.0 * slot + k for k in range(4)]


# -- starting points -----------------------------------------------------------------------------

def _bundled_ckpt(tmp_path, length=32, decay=0.9999, updates=1234):
    K = len(get_tokenizer("bundled", 512))
    raw = {k: v for k, v in random_weights("tiny", K).items()}
    ema = {k: v + 0.01 for k, v in raw.items()}
    path = tmp_path / "last.ckpt"
    write_lightning(path, raw, ema, length=length)
    obj = torch.load(path, weights_only=False)
    obj["ema"]["decay"], obj["ema"]["num_updates"] = decay, updates
    torch.save(obj, path)
    return path, raw, ema


def test_init_from_an_export_and_from_a_public_ckpt(tmp_path):
    from safetensors.torch import load_file

    assert train(_tiny(tmp_path, out=str(tmp_path / "first")))
    exported = load_file(str(tmp_path / "first" / "export" / "model.safetensors"))
    tr = Trainer(_tiny(tmp_path, init_from=str(tmp_path / "first" / "export"), ema=0.999))
    for n, p in tr.model.state_dict().items():
        assert torch.equal(p, exported["backbone." + n]), n
    assert tr.ema_updates == 0 and tr.ema_decay == 0.999
    path, raw, ema = _bundled_ckpt(tmp_path)
    tr = Trainer(_tiny(tmp_path, init_from=str(path), ema=0.999))
    names = [n for n, _ in tr.model.named_parameters()]
    assert all(torch.equal(tr.model.state_dict()[n], raw[n]) for n in names)        # raw weights, as finetune_path
    assert all(torch.equal(e, ema[n]) for n, e in zip(names, tr.ema))                # the checkpoint's EMA continues
    assert (tr.ema_decay, tr.ema_updates) == (0.9999, 1234)
    with pytest.raises(ValueError, match="--init-from .*model_length is 64, this run's is 32"):
        Trainer(_tiny(tmp_path, init_from=str(_bundled_ckpt(tmp_path, length=64)[0])))


def test_dcd_starts_as_the_public_code(tmp_path):
    """Student and teacher from the raw weights; the EMA is the checkpoint's, with its decay and
    update count (the public on_load_checkpoint), not a fresh one at --ema."""
    from duo_fast.training.dcd import DistillConfig, Distiller

    path, raw, ema = _bundled_ckpt(tmp_path)
    run = Distiller(DistillConfig(checkpoint=str(path), tokenizer="bundled", tokenizer_vocab=512, dataset="bundled",
                                    batch_size=4, steps=2, ema=0.999, progress=False, out=str(tmp_path / "dcd")))
    names = [n for n, _ in run.student.named_parameters()]
    assert all(torch.equal(run.student.state_dict()[n], raw[n]) for n in names)
    assert all(torch.equal(run.teacher.state_dict()[n], raw[n]) for n in names)
    assert all(torch.equal(e, ema[n]) for n, e in zip(names, run.ema))
    assert (run.ema_decay, run.ema_updates) == (0.9999, 1234)
    old = Distiller(DistillConfig(checkpoint=str(path), tokenizer="bundled", tokenizer_vocab=512, dataset="bundled",
                                    batch_size=4, steps=2, ema=0.999, init="ema", progress=False,
                                    out=str(tmp_path / "dcd2")))
    assert all(torch.equal(old.student.state_dict()[n], ema[n]) for n in names)
    assert (old.ema_decay, old.ema_updates) == (0.999, 0)


# -- validation during training ------------------------------------------------------------------

def test_validation_every_n_steps_best_weights_and_wandb(tmp_path, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: logged.append(("init", kw)),
                                 log=lambda values, step: logged.append(("log", step, values)),
                                 finish=lambda: logged.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _tiny(tmp_path, steps=7, val_every=2, val_samples=2, val_sample_steps=2, ema=0.9, wandb=True)
    summary = train(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_nelbo" in r]
    assert [r["step"] for r in vals] == [1, 3, 5, 6]                 # every 2 steps, and at the end
    assert all(r["sample_entropy"] > 0 for r in vals)
    best = min(vals, key=lambda r: r["val_nelbo"])
    assert summary["best"] == {"step": best["step"], "val_nelbo": best["val_nelbo"]}
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["duo_fast"]["step"] == best["step"]
    assert logged[0][0] == "init" and logged[-1] == ("finish",)
    assert {k for e in logged if e[0] == "log" for k in e[2]} >= {"train/loss", "val/val_nelbo", "val/sample_entropy"}


def test_wandb_missing_is_one_line_not_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)                  # import wandb raises ImportError
    train(_tiny(tmp_path, steps=2, wandb=True))
    assert "wandb is not installed" in capsys.readouterr().out


# -- data: the recipes on local stand-ins, LM1B padded ------------------------------------------

def _stand_in(monkeypatch, docs_by_split):
    import datasets

    asked = []

    def load(name, config=None, split=None, **kw):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict({"text": docs_by_split[split]})

    monkeypatch.setattr(datasets, "load_dataset", load)
    return asked


def _saved_tokenizer(tmp_path, name):
    tok = get_tokenizer("bundled", 512)
    tok.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_owt_preset_starts_on_a_stand_in_with_the_public_blocks(tmp_path, monkeypatch):
    from duo_fast.cli import build_parser
    from duo_fast.cli import train_config_from_args as _train_config

    docs = [f"document {i} says hello to the world number {i % 7}" for i in range(100_120)]
    asked = _stand_in(monkeypatch, {"train": docs})
    monkeypatch.setenv("DUO_FAST_CACHE", str(tmp_path / "cache"))
    tok_dir = _saved_tokenizer(tmp_path, "gpt2-stand-in")
    args = build_parser().parse_args(["train", "--preset", "owt", "--tokenizer", tok_dir, "--model", "tiny",
                                      "--length", "32", "--batch-size", "4", "--steps", "1", "--no-progress",
                                      "--out", str(tmp_path / "owt")])
    cfg = _train_config(args)
    assert (cfg.dataset, cfg.gamma_min, cfg.gamma_max, cfg.curriculum_end) == ("openwebtext", -3.55, -1.85, 500_000)
    tr = Trainer(cfg)
    assert ("openwebtext", None, "train") in asked
    tok = get_tokenizer(tok_dir)
    bos, eos = special_ids(tok)
    ids = tokenize_documents(tok, docs[:-100_000])                  # the public split: all but the last 100,000
    want = []
    for s in range(0, len(ids), 1000):                               # the public rule, batch by batch
        flat = [t for d in ids[s:s + 1000] for t in d + [eos]]
        for i in range(0, len(flat) // 30 * 30, 30):
            want.append([bos] + flat[i:i + 30] + [eos])
    assert tr.train_blocks[:].tolist() == want
    assert tr.val_blocks.shape[0] > tr.train_blocks.shape[0]        # the last 100,000 documents


def test_lm1b_preset_trains_on_padded_sentences_with_a_masked_loss(tmp_path, monkeypatch):
    from transformers import BertTokenizerFast

    from duo_fast.cli import build_parser
    from duo_fast.cli import train_config_from_args as _train_config
    from duo_fast.data.eval_sets import lm1b_detokenize

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the cat sat on a mat , . dog ran".split()]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "bert")
    train_docs = [" ".join(["the cat sat on a mat ."] * (1 + i % 4)) for i in range(40)]
    test_docs = ["the dog ran , the cat sat .", "a dog ran ."] * 6
    asked = _stand_in(monkeypatch, {"train": train_docs, "test": test_docs})
    monkeypatch.setenv("DUO_FAST_CACHE", str(tmp_path / "cache"))
    args = build_parser().parse_args(["train", "--preset", "lm1b", "--tokenizer", str(tmp_path / "bert"), "--model",
                                      "tiny", "--length", "16", "--batch-size", "4", "--steps", "1", "--no-progress",
                                      "--out", str(tmp_path / "lm1b")])
    cfg = _train_config(args)
    assert cfg.dataset == "lm1b" and cfg.gamma_min == -3.5 and cfg.gamma_max == -1.75
    tr = Trainer(cfg)
    assert ("lm1b", None, "test") in asked                           # LM1B validates on its test split
    tok = BertTokenizerFast.from_pretrained(tmp_path / "bert")
    want = tok([lm1b_detokenize(d) for d in train_docs], max_length=16, padding="max_length", truncation=True)
    assert tr.train_blocks[:].tolist() == want["input_ids"]
    assert tr.pad_id == tok.pad_token_id and (tr.train_blocks[:] == tok.pad_token_id).any()
    x0 = tr.train_blocks[0:4].to(tr.device)
    inputs = tr.draw_inputs(x0, 3, True, 0, None)                        # a discrete-phase draw
    tr.objective.eval()
    with torch.no_grad():
        got = float(tr.objective(x0, **inputs))
        losses = ref.rb_loss_ref(tr.model(inputs["zt"], inputs["sigma"]).double(), inputs["zt"], x0, inputs["alpha"],
                                 inputs["dalpha"])
    keep = torch.tensor(want["attention_mask"][:4], dtype=torch.float64)   # the public loss weights
    assert got == pytest.approx(float((losses * keep).sum() / keep.sum()), rel=1e-4)
    assert got != pytest.approx(float(losses.mean()), rel=1e-3), "padding must change the mean"


# -- evaluation sets -----------------------------------------------------------------------------

def test_zero_shot_sets_use_the_public_splits_and_eos_rule(tmp_path, monkeypatch):
    from duo_fast.data.eval_sets import EVAL_SETS, eval_blocks

    splits = {name: s.split for name, s in EVAL_SETS.items()}
    assert splits["wikitext103"] == splits["wikitext2"] == splits["ptb"] == "validation"
    assert splits["scientific_papers_pubmed"] == splits["scientific_papers_arxiv"] == "validation"
    assert splits["lm1b-gpt2"] == splits["ag_news"] == "test"
    zero_shot = ["ag_news", "scientific_papers_pubmed", "scientific_papers_arxiv", "lambada", "wikitext2", "wikitext103",
                 "ptb", "lm1b-gpt2"]                                 # scripts/zero_shot_duo.sh: insert_valid_eos=False
    assert not any(EVAL_SETS[n].insert_eos for n in zero_shot)
    assert EVAL_SETS["openwebtext-valid"].insert_eos and EVAL_SETS["lm1b-wrap"].insert_eos
    tok = get_tokenizer("bundled", 512)
    bos, eos = special_ids(tok)
    lines = [{"text": "\u201cHello,\u201d she said. The end"}, {"text": "A second story with words"}] * 20
    path = tmp_path / "lambada_test.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    blocks = eval_blocks("lambada", tok, 16, lambada_file=str(path))
    ids = tokenize_documents(tok, ['\n"Hello," she said. The end', "\nA second story with words"] * 20)
    flat = [t for d in ids for t in d]                              # no EOS between documents
    want = [[bos] + flat[i:i + 14] + [eos] for i in range(0, len(flat) // 14 * 14, 14)]
    assert blocks.tolist() == want
    with_eos = eval_blocks("lambada", tok, 16, lambada_file=str(path), insert_eos=True)
    assert with_eos.shape[0] > blocks.shape[0]


def test_distillation_validates_every_n_steps(tmp_path):
    from duo_fast.training.dcd import DistillConfig, distill

    path, _, _ = _bundled_ckpt(tmp_path)
    summary = distill(DistillConfig(checkpoint=str(path), tokenizer="bundled", tokenizer_vocab=512, dataset="bundled",
                                    batch_size=4, steps=5, val_every=2, val_batches=2, val_samples=2, ema=0.99,
                                    update_every=2, progress=False, out=str(tmp_path / "dcd")))
    records = [json.loads(x) for x in (tmp_path / "dcd" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_nelbo" in r]
    assert [r["step"] for r in vals] == [1, 3, 4] and all(r["sample_entropy"] > 0 for r in vals)
    assert summary["best"]["val_nelbo"] == min(r["val_nelbo"] for r in vals)
    assert (tmp_path / "dcd" / "best" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["wikitext2", "wikitext103", "ptb", "ag_news", "scientific_papers_pubmed",
                                  "scientific_papers_arxiv", "lm1b-gpt2", "lm1b-wrap"])
def test_each_hub_eval_set_reads_its_split_detokenises_and_frames_as_public(name, monkeypatch):
    import datasets

    from duo_fast.data.eval_sets import DETOKENIZERS, EVAL_SETS, eval_blocks

    e_set = EVAL_SETS[name]
    raw = ["The cat @-@ dog sat , did n't it ?", "A second line ( with brackets ) ."] * 30
    asked = []

    def load(path, config=None, split=None, **kw):
        asked.append((path, config, split))
        return datasets.Dataset.from_dict({e_set.field: raw})

    monkeypatch.setattr(datasets, "load_dataset", load)
    tok = get_tokenizer("bundled", 512)
    bos, eos = special_ids(tok)
    blocks = eval_blocks(name, tok, 16)
    assert asked == [(e_set.path, e_set.config, e_set.split)]
    docs = [DETOKENIZERS[e_set.detok](d) for d in raw] if e_set.detok else raw
    flat = [t for d in tokenize_documents(tok, docs) for t in d + ([eos] if e_set.insert_eos else [])]
    assert blocks.tolist() == [[bos] + flat[i:i + 14] + [eos] for i in range(0, len(flat) // 14 * 14, 14)]


def test_eval_of_padded_lm1b_counts_only_real_tokens(tmp_path, monkeypatch, capsys):
    import datasets
    from transformers import BertTokenizerFast

    from duo_fast.cli import main
    from duo_fast.io.hf_folder import save_hf_folder
    from duo_fast.model import DiT, DiTConfig

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the cat sat on a mat , . dog ran".split()]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    tok.save_pretrained(tmp_path / "bert")
    save_hf_folder(DiT(DiTConfig.from_name("tiny", vocab_size=len(tok), model_length=16)), tmp_path / "m")
    sentences = ["the cat sat on a mat .", "a dog ran ."] * 8
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": sentences}))
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "bert"), "--dataset", "lm1b",
                 "--eval-batch", "4", "--json", str(out), "--no-progress"]) == 0
    real = sum(len(tok(s)["input_ids"]) for s in sentences)                 # [CLS] .. [SEP], no padding
    assert json.loads(out.read_text())["tokens"] == real < 16 * len(sentences)


def test_detokenisers_apply_the_public_rules():
    """Inputs that exercise the public rules, with the outputs worked out by hand from them."""
    from duo_fast.data.eval_sets import lambada_detokenize, lm1b_detokenize, ptb_detokenize, scientific_detokenize
    from duo_fast.data.eval_sets import wikitext_detokenize as wt

    assert wt(' = = Heading = = \n The cat @-@ dog , ( x ) sat \'s " a " . ') == \
        ' == Heading ==\nThe cat-dog, (x) sat\'s "a". '
    assert wt("1 @,@ 000 @.@ 5 ; [ a ] { b } = = = = x") == "1,000.5; [a] {b} ==== x"
    assert ptb_detokenize("he 's got N N N $ 1 <unk> n't") == "he's got 1 1 1 $1 ?n't"
    assert lm1b_detokenize("He said , `` hello '' . http : / / x") == "He said, `` hello '' . http://x"
    assert lm1b_detokenize("It 's ( so ) good !") == "It's (so) good!"
    assert lambada_detokenize("\u201chi\u201d there ") == '\n"hi" there'
    assert scientific_detokenize("a @-@ b , c .") == "a-b, c."
