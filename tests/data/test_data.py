"""Data: the bundled corpus, the tokenizer, wrapping, and the datasets-based loaders on local files."""

from __future__ import annotations

import json

import pytest

from duo_fast.data import (
    blocks_from_documents,
    bundled_documents,
    get_tokenizer,
    load_text_documents,
    special_ids,
    tokenize_documents,
    wrap_blocks,
)


def test_bundled_corpus_is_english_text():
    docs = bundled_documents()
    assert len(docs) > 2000
    assert sum(len(d) for d in docs) > 1_000_000
    assert any("hacker" in d for d in docs)


def test_wrap_blocks():
    # documents + EOS: 5 6 7 E 8 E 9 10 E -> chunks of L - 2 = 2, remainder dropped, framed BOS .. EOS
    blocks = wrap_blocks([[5, 6, 7], [8], [9, 10]], length=4, bos_id=1, eos_id=2)
    assert blocks.tolist() == [[1, 5, 6, 2], [1, 7, 2, 2], [1, 8, 2, 2], [1, 9, 10, 2]]
    with pytest.raises(ValueError, match="fewer than one block"):
        wrap_blocks([[5]], length=10, bos_id=1, eos_id=2)


def _public_rule(token_lists, length, bos, eos, batch=1000):
    """The public code's rule written out by hand, as its data pipeline applies it: tokenise with
    add_special_tokens=False, append EOS to each document, datasets.map(batched=True) with
    1000 documents per batch, and per batch: chain, keep (total // (L-2)) * (L-2) ids, and frame
    every chunk of L-2 as [BOS] + chunk + [EOS]."""
    out = []
    for s in range(0, len(token_lists), batch):
        concatenated = [t for ids in token_lists[s:s + batch] for t in ids + [eos]]
        total = (len(concatenated) // (length - 2)) * (length - 2)
        for i in range(0, total, length - 2):
            out.append([bos] + concatenated[i:i + length - 2] + [eos])
    return out


@pytest.mark.parametrize("length", [16, 33])
def test_blocks_follow_the_public_rule_across_batches(length):
    """2,500 documents (three map batches, the last partial) through the bundled tokenizer: our
    blocks equal the hand-written public rule block for block."""
    tok = get_tokenizer("bundled", 512)
    docs = load_text_documents("bundled", "train")[:2500]
    ids = tokenize_documents(tok, docs)
    bos, eos = special_ids(tok)
    want = _public_rule(ids, length, bos, eos)
    got = blocks_from_documents(tok, docs, length)
    assert got.tolist() == want and got.shape == (len(want), length)
    assert (got[:, 0] == bos).all() and (got[:, -1] == eos).all()


def test_a_tokenizer_without_pad_gets_one_as_the_public_code_adds_it(tmp_path):
    """GPT-2 style (no pad token): loading adds [PAD] as the last id, so K = len + 1 (50258 for
    GPT-2); a model of the original size (50257) still matches it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from duo_fast.data import check_tokenizer_vocab

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(str(tmp_path / "gpt2like"))
    tok = get_tokenizer(str(tmp_path / "gpt2like"))
    assert len(tok) == 4 and tok.pad_token == "[PAD]" and tok.pad_token_id == 3
    for K in (3, 4, 5):
        check_tokenizer_vocab(tok, K)
    with pytest.raises(ValueError):
        check_tokenizer_vocab(tok, 7)


def test_lm1b_validates_on_its_test_split_with_the_detokeniser(monkeypatch):
    import datasets

    asked = []

    def fake_load(name, config=None, split=None):
        asked.append((name, split))
        return {"text": ["He said , `` hello '' .", ""]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = load_text_documents("lm1b", "validation")
    assert asked == [("lm1b", "test")]
    assert docs == [ref_lm1b("He said , `` hello '' .")]


def ref_lm1b(text: str) -> str:
    from duo_fast.data.eval_sets import lm1b_detokenize

    return lm1b_detokenize(text)


def test_bundled_tokenizer_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_FAST_CACHE", str(tmp_path))
    tok = get_tokenizer("bundled", vocab_size=600)
    assert len(tok) == 600
    bos, eos = special_ids(tok)
    assert bos != eos
    text = "The hacker ran the program."
    ids = tokenize_documents(tok, [text])[0]
    assert max(ids) < 600 and tok.decode(ids) == text
    again = get_tokenizer(str(tmp_path / "tokenizers" / "jargon-bpe-600"))    # the cached folder
    assert tokenize_documents(again, [text])[0] == ids


def test_local_text_and_jsonl_through_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nsecond document\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two", "three"]))
    assert load_text_documents(f"text:{tmp_path / 'a.txt'}", "all") == ["first document", "second document"]
    assert load_text_documents(str(tmp_path / "b.jsonl"), "all") == ["one", "two", "three"]
    # a local file's training split leaves out its held-out validation documents
    train, val = (load_text_documents(str(tmp_path / "b.jsonl"), s, val_fraction=0.3) for s in ("train", "validation"))
    assert len(val) == 1 and sorted(train + val) == ["one", "three", "two"]
    with pytest.raises(FileNotFoundError):
        load_text_documents(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_text_documents("no-such-corpus")


def test_bundled_splits_are_disjoint():
    train, val = load_text_documents("bundled", "train"), load_text_documents("bundled", "validation")
    assert len(val) > 50 and not set(train[-10:]) & set(val)
