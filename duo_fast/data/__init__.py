"""Text data: the bundled demo corpus, tokenizers, and wrapping into fixed-length blocks.

* ``bundled_documents()``: the Jargon File 4.4.7 (public domain), one document per line, in
  ``jargon.txt.gz`` beside this file (``prepare_jargon.py`` rebuilds it).
* ``get_tokenizer(name_or_path)``: ``"bundled"`` trains a byte-level BPE on that corpus with
  ``tokenizers`` on first use and caches it as a Hugging Face tokenizer folder; anything else is
  passed to ``transformers.AutoTokenizer.from_pretrained`` (hub name or local folder).
* ``load_text_documents(source)``: ``datasets``-based loading of hub corpora (``openwebtext``,
  ``wikitext103``, ``lm1b``) and of local ``.txt`` / ``.jsonl`` files.
* ``wrap_blocks(...)``: documents -> ``(N, L)`` blocks by the public code's rule (each document
  followed by EOS, concatenated per batch of 1,000 documents, chunks of ``L - 2`` framed as
  ``[BOS] chunk [EOS]``; docs/math.md section 8: every block fully valid, no padding).
* ``eval_sets``: the zero-shot evaluation sets with their detokenisers; ``blocks``: the cached,
  memory-mapped training blocks and their seeded order.

May import: ``duo_fast.core``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["bundled_documents", "bundled_corpus_path", "cache_root", "get_tokenizer", "train_bpe_tokenizer",
           "load_text_documents", "wrap_blocks", "padded_blocks", "loss_mask_id", "PADDED_DATASETS",
           "tokenize_documents", "special_ids", "blocks_from_documents", "check_tokenizer_vocab", "held_out_split",
           "tokenizer_for_vocab", "TOKENIZER_BY_VOCAB",
           "hub_error",
           "BlockDataset"]

_HERE = Path(__file__).resolve().parent
BOS, EOS, PAD, UNK = "[BOS]", "[EOS]", "[PAD]", "[UNK]"


def bundled_corpus_path() -> Path:
    return _HERE / "jargon.txt.gz"


def bundled_documents() -> list[str]:
    """The bundled corpus: about 2,200 documents, 1.4 MB of English text."""
    with gzip.open(bundled_corpus_path(), "rt", encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def cache_root() -> Path:
    """Where duo_fast caches tokenizers, T tables and blocks: ``$DUO_FAST_CACHE`` or ``~/.cache/duo_fast``."""
    return Path(os.environ.get("DUO_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "duo_fast")))


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int, out_dir: str | Path) -> Any:
    """Train a byte-level BPE tokenizer with ``[BOS]``/``[EOS]``/``[PAD]``/``[UNK]`` and save it
    as a Hugging Face tokenizer folder at ``out_dir``. Returns the loaded fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    fast.save_pretrained(str(tmp))
    if out_dir.exists():      # another process finished first; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return load_local_tokenizer(out_dir)


def load_local_tokenizer(path: str | Path) -> Any:
    """A tokenizer folder or hub name, with a ``[PAD]`` token added when it has none (as the public
    code does: GPT-2 then has 50258 ids, the vocabulary of the public GPT-2 checkpoints)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
    return tok


def get_tokenizer(name_or_path: str = "bundled", vocab_size: int = 4096) -> Any:
    """A tokenizer by name: ``"bundled"`` (BPE of ``vocab_size`` trained on the bundled corpus,
    cached under ``$DUO_FAST_CACHE``), a local tokenizer folder, or a hub name such as ``gpt2``."""
    if name_or_path == "bundled":
        path = cache_root() / "tokenizers" / f"jargon-bpe-{vocab_size}"
        if (path / "tokenizer.json").exists():
            return load_local_tokenizer(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return train_bpe_tokenizer(bundled_documents(), vocab_size, path)
    try:
        return load_local_tokenizer(name_or_path)
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists():
            raise ValueError(f"tokenizer folder {name_or_path} cannot be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from e
        raise ValueError(f"tokenizer {name_or_path!r} could not be loaded from the Hugging Face hub "
                         f"({type(e).__name__}); offline, pass a local tokenizer folder") from e


# the tokenizers of the public checkpoints, by vocabulary size: the guess when a checkpoint names none
TOKENIZER_BY_VOCAB = {50257: "gpt2", 50258: "gpt2", 30522: "bert-base-uncased"}


def tokenizer_for_vocab(vocab_size: int) -> str | None:
    """The public tokenizer of a model with ``vocab_size`` ids (gpt2, bert-base-uncased), else None."""
    return TOKENIZER_BY_VOCAB.get(vocab_size)


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int) -> None:
    """The model's vocabulary must be the tokenizer's, or one larger (public GPT-2 models add a
    token), or one smaller when the last id is the ``[PAD]`` that duo_fast added to a tokenizer
    without one (a K = 50257 GPT-2 model); anything else means a mismatched tokenizer."""
    n = len(tokenizer)
    added_pad = getattr(tokenizer, "pad_token", None) == PAD and getattr(tokenizer, "pad_token_id", None) == n - 1
    if vocab_size not in (n, n + 1) and not (added_pad and vocab_size == n - 1):
        raise ValueError(f"tokenizer has {n} tokens but the model's vocabulary is {vocab_size}: "
                         "they do not belong together (pass the tokenizer the model was trained with)")


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """``(bos_id, eos_id)``; tokenizers without BOS (GPT-2) use EOS for both, as in section 8."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if eos is None:
        raise ValueError("tokenizer has neither an EOS nor a SEP token to separate documents")
    return (bos if bos is not None else eos), eos


def tokenize_documents(tokenizer: Any, documents: Sequence[str], batch_size: int = 512) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(documents), batch_size):
        enc = tokenizer(list(documents[i:i + batch_size]), add_special_tokens=False)["input_ids"]
        out.extend(enc)
    return out


def blocks_from_documents(tokenizer: Any, documents: Sequence[str], length: int, insert_eos: bool = True,
                          padded: bool = False) -> torch.Tensor:
    """Tokenise ``documents`` into (N, length) blocks: wrapped with the tokenizer's BOS/EOS (EOS
    after each document when ``insert_eos``), or with ``padded`` one block per document as the
    public unwrapped data (:func:`padded_blocks`)."""
    if padded:
        return padded_blocks(tokenizer, documents, length)
    bos, eos = special_ids(tokenizer)
    return wrap_blocks(tokenize_documents(tokenizer, documents), length, bos, eos, insert_eos=insert_eos)


def padded_blocks(tokenizer: Any, documents: Sequence[str], length: int, batch_size: int = 1000) -> torch.Tensor:
    """The public unwrapped data (``data=lm1b``): each document alone, with the tokenizer's own
    special tokens (BERT: ``[CLS] .. [SEP]``), truncated on the right to ``length`` and padded on
    the right with the pad token. The loss ignores the padding (``loss_mask_id``). (N, length) int64."""
    if tokenizer.pad_token_id is None:
        raise ValueError("padded blocks need a tokenizer with a pad token")
    tokenizer.padding_side, tokenizer.truncation_side = "right", "right"
    rows = []
    for i in range(0, len(documents), batch_size):
        enc = tokenizer(list(documents[i:i + batch_size]), max_length=length, padding="max_length", truncation=True,
                        add_special_tokens=True)["input_ids"]
        rows.append(torch.tensor(enc, dtype=torch.int64).reshape(-1, length))
    if not rows:
        raise ValueError("no documents to pad into blocks")
    return torch.cat(rows)


PADDED_DATASETS = ("lm1b",)       # trained on padded sentences, as the public data=lm1b (wrap: False)


def loss_mask_id(dataset: str, tokenizer: Any) -> int | None:
    """The id whose positions the loss ignores: the pad token for padded data sets, else None."""
    return tokenizer.pad_token_id if dataset in PADDED_DATASETS else None


def wrap_blocks(token_lists: Iterable[Sequence[int]], length: int, bos_id: int, eos_id: int,
                batch_docs: int = 1000, insert_eos: bool = True) -> torch.Tensor:
    """The public code's wrapping: each document's ids followed by EOS (unless ``insert_eos`` is
    off, as the public zero-shot evaluation runs it); within each batch of ``batch_docs``
    documents (``datasets.map(batched=True)``'s default, single process) the ids are
    concatenated and cut into chunks of ``length - 2``, the batch's remainder dropped; every block
    is ``[BOS] + chunk + [EOS]``. Returns (N, length) int64; every block fully valid."""
    if length < 3:
        raise ValueError(f"wrapped blocks need length >= 3 (BOS, tokens, EOS), got {length}")
    chunk = length - 2
    docs = [list(ids) for ids in token_lists]
    if not docs:
        raise ValueError("no documents to wrap")
    rows: list[np.ndarray] = []
    for start in range(0, len(docs), batch_docs):
        tail = (eos_id,) if insert_eos else ()
        flat = np.fromiter((t for ids in docs[start:start + batch_docs] for t in (*ids, *tail)), dtype=np.int64)
        n = flat.size // chunk
        if n:
            body = flat[: n * chunk].reshape(n, chunk)
            rows.append(np.concatenate([np.full((n, 1), bos_id), body, np.full((n, 1), eos_id)], axis=1))
    if not rows:
        total = sum(len(d) + 1 for d in docs)
        raise ValueError(f"corpus has {total} tokens, fewer than one block of length {length} in any batch of "
                         f"{batch_docs} documents")
    return torch.from_numpy(np.concatenate(rows))


_HUB = {
    "openwebtext": ("openwebtext", None, "text"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "text"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "lm1b": ("lm1b", None, "text"),
    "lm1b-wrap": ("lm1b", None, "text"),
}


def _check_local_file(path: str, kind: str, text_field: str) -> None:
    """One clear error naming the file (and line) for what ``datasets`` reports obscurely:
    an empty file, bytes that are not UTF-8, a JSON line that does not parse or has no text."""
    import json as _json

    raw = Path(path).read_bytes()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"dataset file {path} is not UTF-8 text (line {line}, byte {e.start})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"dataset file {path} is empty")
    if kind == "json":
        for i, ln in enumerate(text.splitlines(), 1):
            if not ln.strip():
                continue
            try:
                rec = _json.loads(ln)
            except _json.JSONDecodeError as e:
                raise ValueError(f"dataset file {path}, line {i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise ValueError(f"dataset file {path}, line {i}: no string field {text_field!r}")


def held_out_split(documents: list[str], split: str, fraction: float, source: str) -> list[str]:
    """A fixed, seeded choice of ``ceil(fraction * N)`` documents for validation (at least one);
    the rest for training. Never the same document in both."""
    n = len(documents)
    if n < 2:
        raise ValueError(f"{source} has {n} document(s); a held-out validation split needs at least 2")
    n_val = min(n - 1, max(1, int(np.ceil(fraction * n))))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    chosen = sorted(order[:n_val]) if split != "train" else sorted(order[n_val:])
    return [documents[i] for i in chosen]


def load_text_documents(source: str, split: str = "train", text_field: str = "text",
                        val_fraction: float = 0.05) -> list[str]:
    """Documents from ``bundled``, a hub corpus (``openwebtext``, ``wikitext103``, ``wikitext2``,
    ``lm1b``), or a local file ``text:PATH`` / ``PATH`` ending in ``.txt``, ``.txt.gz`` (one
    document per line) or ``.jsonl``/``.json`` (field ``text_field``), through ``datasets``.
    A local file has no splits: ``val_fraction`` of its documents (a fixed choice) are the
    validation split and never appear in the training split; ``split="all"`` gives every one.

    OpenWebText has no validation split: its last 100,000 documents are used (section 8)."""
    if source == "bundled":
        docs = bundled_documents()
        cut = int(len(docs) * 0.95)
        return docs[:cut] if split == "train" else docs[cut:]
    import datasets

    path = source[5:] if source.startswith("text:") else source
    if source.startswith("text:") or os.path.sep in source or Path(path).suffix in (".txt", ".gz", ".jsonl", ".json"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"dataset file {path!r} does not exist")
        kind = "json" if path.endswith((".jsonl", ".json")) else "text"
        _check_local_file(path, kind, text_field)
        ds = datasets.load_dataset(kind, data_files={"data": path}, split="data")
        field = text_field if kind == "json" else "text"
        if field not in ds.column_names:
            raise ValueError(f"{path}: no field {field!r}; fields are {ds.column_names}")
        docs = [t for t in ds[field] if t and t.strip()]
        return docs if split == "all" else held_out_split(docs, split, val_fraction, path)
    if source not in _HUB:
        raise ValueError(f"unknown dataset {source!r}: use bundled, {', '.join(_HUB)}, or text:PATH")
    name, config, field = _HUB[source]
    try:
        return _hub_documents(datasets, source, name, config, field, split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        raise hub_error(source, e) from e


def hub_error(source: str, e: BaseException) -> ValueError:
    """One line for a hub data set that cannot be reached (offline, or no such name)."""
    return ValueError(f"dataset {source!r} could not be loaded from the Hugging Face hub ({type(e).__name__}); "
                      f"offline, use a local file: --dataset text:PATH")


def _hub_documents(datasets: Any, source: str, name: str, config: str | None, field: str, split: str) -> list[str]:
    """Documents of a hub corpus with the public code's splits and detokenisers: LM1B's
    validation is its test split; LM1B and WikiText are detokenised for training too."""
    from duo_fast.data.eval_sets import DETOKENIZERS

    detok = {"lm1b": "lm1b", "lm1b-wrap": "lm1b", "wikitext103": "wikitext", "wikitext2": "wikitext"}.get(source)
    lm1b = source in ("lm1b", "lm1b-wrap")
    docs = _hub_split(datasets, source, name, config, field, "test" if lm1b and split != "train" else split)
    return [DETOKENIZERS[detok](d) for d in docs] if detok else docs


def _hub_split(datasets: Any, source: str, name: str, config: str | None, field: str, split: str) -> list[str]:
    if source == "openwebtext":
        ds = datasets.load_dataset(name, split="train")
        n = len(ds)
        ds = ds.select(range(0, n - 100_000)) if split == "train" else ds.select(range(n - 100_000, n))
    else:
        ds = datasets.load_dataset(name, config, split=split)
    return [t for t in ds[field] if t and t.strip()]


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length blocks (N, L) int64 as a map-style dataset."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be (N, L), got {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]
