"""Tokenised training blocks cached on disk (memory-mapped), and the order in which ranks read
them: deterministic from the seed, sharded by rank, resumable mid-epoch (docs/math.md section 8).

The cache key covers everything the blocks depend on: the dataset (for a local file also its
size and modification time), the split, the tokenizer's name and vocabulary, the block length
and the format version. A cache file is written to a temporary name and renamed, so a crash
never leaves a half-written cache behind, and a restart never re-tokenises.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["cached_blocks", "MappedBlocks", "BlockOrder", "cache_dir"]

_FORMAT = 4     # 2: held-out split of local files; 3: the public code's wrapping rule; 4: padded LM1B


def cache_dir() -> Path:
    """``$DUO_FAST_CACHE/blocks`` (default ``~/.cache/duo_fast/blocks``)."""
    root = os.environ.get("DUO_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "duo_fast")
    return Path(root) / "blocks"


def _source_stamp(dataset: str) -> dict[str, Any]:
    path = dataset[5:] if dataset.startswith("text:") else dataset
    if os.path.exists(path):
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"name": dataset}


class MappedBlocks:
    """(N, L) token blocks in a read-only memory map; indexing (an index tensor or a slice)
    reads just those rows and returns them as an int64 tensor."""

    def __init__(self, data: np.ndarray, path: Path | None = None) -> None:
        import warnings

        self.data, self.path = data, path
        with warnings.catch_warnings():              # a read-only map: the tensor view is never written
            warnings.simplefilter("ignore", UserWarning)
            self._view = torch.from_numpy(data)      # once: indexing then runs as torch ops on the map

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, idx: torch.Tensor | slice | int) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            return self._view.index_select(0, idx.cpu()).to(torch.int64)
        return torch.from_numpy(np.asarray(self.data[idx], dtype=np.int64))


def cached_blocks(dataset: str, split: str, tokenizer: Any, tokenizer_name: str, length: int,
                  directory: str | Path | None = None, val_fraction: float = 0.05) -> MappedBlocks:
    """The (N, length) blocks of ``dataset``'s ``split``, memory-mapped from the cache; tokenised,
    wrapped with BOS/EOS (padded sentences for ``PADDED_DATASETS``) and cached first if they are not there."""
    from duo_fast.data import PADDED_DATASETS, blocks_from_documents, load_text_documents

    key = {"format": _FORMAT, "source": _source_stamp(dataset), "split": split, "tokenizer": tokenizer_name,
           "vocab": len(tokenizer), "length": length, "val_fraction": val_fraction}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(directory) if directory is not None else cache_dir()
    path = folder / f"{digest}.npy"
    if not path.exists():
        blocks = blocks_from_documents(tokenizer, load_text_documents(dataset, split, val_fraction=val_fraction),
                                       length, padded=dataset in PADDED_DATASETS)
        dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{digest}.{os.getpid()}.tmp.npy"
        np.save(tmp, blocks.numpy().astype(dtype))
        os.replace(tmp, path)
        (folder / f"{digest}.json").write_text(json.dumps(key, indent=2))
    data = np.load(path, mmap_mode="r")
    if data.ndim != 2 or data.shape[1] != length:
        raise ValueError(f"block cache {path} has shape {data.shape}, expected (N, {length}): delete it")
    return MappedBlocks(data, path)


class BlockOrder:
    """Which blocks each rank reads: every epoch a permutation drawn from ``seed + epoch``; each
    global batch is ``batch_size * world`` consecutive entries of it, rank ``r`` reading its
    ``r``-th slice (ranks never share a block within an epoch); the incomplete tail of an epoch
    is skipped. ``state_dict()`` / ``load_state_dict()`` resume mid-epoch exactly."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        if n_blocks < batch_size * world:
            raise ValueError(f"{n_blocks} blocks cannot fill one global batch of {batch_size} x {world} ranks")
        self.n, self.batch, self.seed, self.rank, self.world = n_blocks, batch_size, seed, rank, world
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return self._perm

    def next_indices(self) -> torch.Tensor:
        """This rank's block indices for the next optimizer step, (batch_size,) int64."""
        step = self.batch * self.world
        if self.position + step > self.n:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        start = self.position + self.rank * self.batch
        idx = self._permutation()[start:start + self.batch]
        self.position += step
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n_blocks": self.n, "batch_size": self.batch,
                "world": self.world, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("n_blocks", "batch_size", "world", "seed"):
            mine = {"n_blocks": self.n, "batch_size": self.batch, "world": self.world, "seed": self.seed}[k]
            if state[k] != mine:
                raise ValueError(f"cannot resume the data order: {k} was {state[k]}, is now {mine}")
        self.epoch, self.position, self._perm = state["epoch"], state["position"], None
