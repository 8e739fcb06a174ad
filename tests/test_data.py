"""Data: the bundled corpus, the tokenizer, wrapping, and the datasets-based loaders on local files."""

from __future__ import annotations

import json

import pytest

from duo_fast.data import (
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
    blocks = wrap_blocks([[5, 6, 7], [8], [9, 10]], length=4, bos_id=1, eos_id=2)
    assert blocks.tolist() == [[1, 5, 6, 7], [2, 1, 8, 2], [1, 9, 10, 2]]
    with pytest.raises(ValueError, match="fewer than one block"):
        wrap_blocks([[5]], length=10, bos_id=1, eos_id=2)


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
