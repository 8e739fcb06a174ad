"""Tokenised blocks cached on disk (memory-mapped; never re-tokenised) and the rank-sharded,
resumable data order."""

from __future__ import annotations

import pytest
import torch

from duo_fast.data import blocks_from_documents, get_tokenizer, load_text_documents
from duo_fast.data.blocks import BlockOrder, cached_blocks


def test_cache_is_written_once_and_matches_tokenisation(tmp_path, monkeypatch):
    tok = get_tokenizer("bundled", 512)
    direct = blocks_from_documents(tok, load_text_documents("bundled", "validation"), 32)
    first = cached_blocks("bundled", "validation", tok, "bundled-512", 32, directory=tmp_path)
    assert first.shape == tuple(direct.shape) and torch.equal(first[torch.arange(len(first))], direct)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len([f for f in files if f.endswith(".npy")]) == 1 and not any(".tmp" in f for f in files)
    import duo_fast.data as data_mod

    def fail(*a, **k):
        raise AssertionError("re-tokenised although the cache exists")
    monkeypatch.setattr(data_mod, "blocks_from_documents", fail)
    again = cached_blocks("bundled", "validation", tok, "bundled-512", 32, directory=tmp_path)
    assert torch.equal(again[3:7], direct[3:7]) and again[torch.tensor([5, 1])].dtype == torch.int64
    # another length is another cache entry
    monkeypatch.undo()
    cached_blocks("bundled", "validation", tok, "bundled-512", 16, directory=tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".npy"]) == 2


def test_ranks_read_disjoint_blocks_and_resume_exactly():
    n, B, world = 103, 4, 3
    orders = [BlockOrder(n, B, seed=7, rank=r, world=world) for r in range(world)]
    for step in range(8):                                   # 8 steps x 12 = 96 <= 103: one epoch
        got = [o.next_indices() for o in orders]
        flat = torch.cat(got)
        assert flat.unique().numel() == B * world, f"ranks overlap at step {step}"
    seen_epoch = orders[0].epoch
    ref = BlockOrder(n, B, seed=7, rank=1, world=world)
    full = [ref.next_indices() for _ in range(20)]          # crosses an epoch boundary
    resumed = BlockOrder(n, B, seed=7, rank=1, world=world)
    for _ in range(11):
        resumed.next_indices()
    state = resumed.state_dict()
    fresh = BlockOrder(n, B, seed=7, rank=1, world=world)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.next_indices(), full[i]) for i in range(11, 20))
    assert seen_epoch == 0 and ref.epoch == 2
    with pytest.raises(ValueError, match="seed"):
        BlockOrder(n, B, seed=8, rank=1, world=world).load_state_dict(state)
