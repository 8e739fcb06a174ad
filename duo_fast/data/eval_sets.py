"""The evaluation sets of the public scripts (hub path, split, text field, EOS rule), their
detokenisers, and the evaluation blocks built from them (docs/protocols.md).

May import: ``duo_fast.core`` and the rest of ``duo_fast.data``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from duo_fast.data import blocks_from_documents, load_text_documents

__all__ = ["EVAL_DATASETS", "EVAL_SETS", "EVAL_ALIASES", "EvalSet", "DETOKENIZERS", "eval_documents", "eval_blocks",
           "eval_pad_id", "wikitext_detokenize", "ptb_detokenize", "lm1b_detokenize", "lambada_detokenize",
           "scientific_detokenize"]


# ---------------------------------------------------------------------------------------------
# Detokenisers: undo the tokenisation artefacts of each corpus before our tokenizer sees it.
# ---------------------------------------------------------------------------------------------

# Each detokeniser is an ordered list of rules: ("s", old, new) a plain replacement, ("r", pattern,
# replacement) a regular expression; the order and the rules are the public data pipeline's.
_Rule = tuple[str, str, str]

_WIKITEXT: list[_Rule] = [
    ("s", "s '", "s'"), ("r", r"/' [0-9]/", r"/'[0-9]/"),                       # contractions
    ("s", " @-@ ", "-"), ("s", " @,@ ", ","), ("s", " @.@ ", "."),              # number separators
    ("s", " : ", ": "), ("s", " ; ", "; "), ("s", " . ", ". "), ("s", " ! ", "! "), ("s", " ? ", "? "),
    ("s", " , ", ", "),                                                         # punctuation
    ("r", r"\(\s*([^\)]*?)\s*\)", r"(\1)"), ("r", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),   # brackets, quotes
    ("r", r"{\s*([^}]*?)\s*}", r"{\1}"), ("r", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("r", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("s", "= = = =", "===="), ("s", "= = =", "==="), ("s", "= =", "=="),        # headings
    ("s", " \u00b0 ", "\u00b0"), ("s", " \n", "\n"), ("s", "\n ", "\n"), ("s", " N ", " 1 "), ("s", " 's", "'s"),
]
_PTB: list[_Rule] = [
    ("s", " 's", "'s"), ("s", "s ' ", "s' "), ("s", " n't", "n't"), ("s", " \n ", "\n"), ("s", "\\/", "/"),
    *[("s", " N ", " 1 ")] * 10,                                                # " N N N": ten passes
    ("s", "$ 1", "$1"), ("s", "# 1", "#1"), ("s", "<unk>", "?"),
]
_LM1B: list[_Rule] = [
    ("s", "http : / / ", "http://"), ("s", "https : / / ", "https://"), ("r", r" \'(\w+)", r"'\1"),
    ("r", r" (\w+) \. ", r" \1. "), ("r", r" (\w+) \.$", r" \1."), ("s", " ? ", "? "), ("r", r" \?$", "?"),
    ("s", " ! ", "! "), ("r", r" \!$", "!"), ("s", " , ", ", "), ("s", " : ", ": "), ("s", " ; ", "; "),
    ("s", " / ", "/"), ("r", r"\" ([^\"]+) \"", r'"\1"'), ("r", r"\' ([^\']+) \'", r"'\1'"),
    ("r", r"\( ([^\(\)]+) \)", r"(\1)"), ("r", r"\[ ([^\[\]]+) \]", r"[\1]"), ("s", "$ ", "$"),
    ("s", "\u00a3 ", "\u00a3"),
]


def _apply(rules: list[_Rule], text: str) -> str:
    for kind, old, new in rules:
        text = text.replace(old, new) if kind == "s" else re.sub(old, new, text)
    return text


def wikitext_detokenize(s: str) -> str:
    return _apply(_WIKITEXT, s)


def ptb_detokenize(s: str) -> str:
    return _apply(_PTB, s)


def lm1b_detokenize(s: str) -> str:
    return _apply(_LM1B, s)


def lambada_detokenize(s: str) -> str:
    """Curly double quotes to straight ones, and a leading newline (the public rule)."""
    return "\n" + s.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_detokenize(s: str) -> str:
    return lm1b_detokenize(wikitext_detokenize(s))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenize, "ptb": ptb_detokenize, "lm1b": lm1b_detokenize,
    "lambada": lambada_detokenize, "scientific": scientific_detokenize,
}

LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set as the public code reads it: hub path and config, the split it
    validates on, the text field, the detokeniser, whether each document gets an EOS (the public
    zero-shot script sets ``insert_valid_eos=False``) and whether it is padded (unwrapped) data."""

    path: str
    config: str | None
    split: str
    field: str
    detok: str | None
    insert_eos: bool
    padded: bool = False


# The public zero-shot sets (scripts/zero_shot_duo.sh: wrapped, no EOS; validation split, test
# for lm1b and ag_news), and the in-distribution sets of its eval scripts (EOS inserted).
EVAL_SETS: dict[str, EvalSet] = {
    "openwebtext-valid": EvalSet("openwebtext", None, "validation", "text", None, True),
    "wikitext103": EvalSet("wikitext", "wikitext-103-raw-v1", "validation", "text", "wikitext", False),
    "wikitext2": EvalSet("wikitext", "wikitext-2-raw-v1", "validation", "text", "wikitext", False),
    "ptb": EvalSet("ptb_text_only", None, "validation", "sentence", "ptb", False),
    "lambada": EvalSet(LAMBADA_URL, None, "test", "text", "lambada", False),
    "ag_news": EvalSet("ag_news", None, "test", "text", None, False),
    "scientific_papers_pubmed": EvalSet("scientific_papers", "pubmed", "validation", "article", "scientific", False),
    "scientific_papers_arxiv": EvalSet("scientific_papers", "arxiv", "validation", "article", "scientific", False),
    "lm1b-gpt2": EvalSet("lm1b", None, "test", "text", "lm1b", False),
    "lm1b-wrap": EvalSet("lm1b", None, "test", "text", "lm1b", True),
    "lm1b": EvalSet("lm1b", None, "test", "text", "lm1b", True, padded=True),
}
EVAL_ALIASES = {"pubmed": "scientific_papers_pubmed", "arxiv": "scientific_papers_arxiv"}
EVAL_DATASETS = tuple(EVAL_SETS)


def eval_documents(name: str, lambada_file: str | None = None) -> list[str]:
    """Detokenised documents of an evaluation set, or of a local file ``text:PATH``;
    ``lambada_file``: a local copy of the LAMBADA test jsonl (the public code downloads it)."""
    if name.startswith("text:") or name == "bundled":
        return load_text_documents(name, "validation" if name == "bundled" else "all")
    name = EVAL_ALIASES.get(name, name)
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation dataset {name!r}; choose {', '.join(EVAL_SETS)} or text:PATH")
    if name == "openwebtext-valid":
        return load_text_documents("openwebtext", "validation")
    import datasets

    from duo_fast.data import hub_error

    e_set = EVAL_SETS[name]
    try:
        if name == "lambada":
            ds = datasets.load_dataset("json", data_files={"test": lambada_file or LAMBADA_URL}, split="test")
        else:
            ds = datasets.load_dataset(e_set.path, e_set.config, split=e_set.split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        if name == "lambada" and not lambada_file:
            raise ValueError("LAMBADA is read from openaipublic.blob.core.windows.net, which cannot be reached; "
                             "pass a local copy of lambada_test.jsonl with --lambada-file") from e
        raise hub_error(name, e) from e
    docs = [t for t in ds[e_set.field] if t and t.strip()]
    return [DETOKENIZERS[e_set.detok](d) for d in docs] if e_set.detok else docs


def eval_blocks(name: str, tokenizer: Any, length: int, max_docs: int | None = None, insert_eos: bool | None = None,
                lambada_file: str | None = None) -> Tensor:
    """The (N, length) blocks of an evaluation set by the public rule of that set (wrapped, EOS
    or not, or padded); ``insert_eos`` overrides the set's EOS rule (local files: EOS inserted)."""
    docs = eval_documents(name, lambada_file)
    if max_docs:
        docs = docs[:max_docs]
    e_set = EVAL_SETS.get(EVAL_ALIASES.get(name, name))
    eos = insert_eos if insert_eos is not None else (e_set.insert_eos if e_set else True)
    return blocks_from_documents(tokenizer, docs, length, insert_eos=eos, padded=bool(e_set and e_set.padded))


def eval_pad_id(name: str, tokenizer: Any) -> int | None:
    """The pad id the NELBO ignores for a padded evaluation set, else None."""
    e_set = EVAL_SETS.get(EVAL_ALIASES.get(name, name))
    return tokenizer.pad_token_id if e_set is not None and e_set.padded else None
