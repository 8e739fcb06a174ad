"""Evaluation: validation / zero-shot perplexity from the RB NELBO (docs/math.md sections 3, 8),
and generative perplexity of samples under a causal LM with the samples' unigram entropy.

Perplexity: blocks of the model's length (documents detokenised, wrapped with BOS/EOS); per
batch, stratified times, the log-linear schedule, ``z_t ~ q_t`` and the per-token RB loss; the
reported value is ``exp`` of the mean over all tokens. It is an upper bound on the true
perplexity (a NELBO, one Monte-Carlo draw of ``t`` per sequence).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import reference as ref
from .data import blocks_from_documents, check_tokenizer_vocab, load_text_documents
from .model import DiT
from .ops import rb_loss

__all__ = ["EVAL_DATASETS", "EVAL_SETS", "EvalSet", "eval_pad_id", "DETOKENIZERS", "eval_documents",
           "discrete_nelbo_draws", "evaluate_nelbo", "validation_nelbo", "sample_metrics", "check_scorer",
           "check_tokenizer_vocab", "unigram_entropy", "generative_perplexity"]


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

    from .data import hub_error

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


def discrete_nelbo_draws(x0: Tensor, vocab_size: int, generator: torch.Generator, strata: int | None = None,
                         first: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The random part of one NELBO evaluation batch: ``(z_t, alpha_t, dalpha_t)`` with
    stratified ``t`` (strata ``first ..`` of ``strata``, see ``reference.stratified_times``) and
    the log-linear schedule (float64 alphas, one per sequence)."""
    t = ref.stratified_times(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64, strata=strata,
                             first=first)
    alpha, dalpha = ref.alpha_loglinear(t)
    return ref.sample_qt(x0, alpha, vocab_size, generator=generator), alpha, dalpha


@torch.no_grad()
def evaluate_nelbo(model: DiT, blocks: Tensor, batch_size: int = 16, seed: int = 0, device: str | torch.device = "cpu",
                   max_batches: int | None = None, progress: bool = True, pad_id: int | None = None) -> dict[str, float]:
    """Mean per-token NELBO (nats) and its perplexity over ``blocks`` (N, L) int64; with
    ``pad_id``, over the tokens that are not padding (the public attention-mask weighting)."""
    from tqdm.auto import tqdm

    model.eval()
    device = torch.device(device)
    K = model.config.vocab_size
    if blocks.numel() and int(blocks.max()) >= K:
        raise ValueError(f"token id {int(blocks.max())} is outside the model's vocabulary of {K}")
    gen = torch.Generator(device=device).manual_seed(seed)
    n_batches = math.ceil(blocks.shape[0] / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    total, count = 0.0, 0
    for b in tqdm(range(n_batches), disable=not progress, desc="eval", dynamic_ncols=True):
        x0 = blocks[b * batch_size:(b + 1) * batch_size].to(device)
        zt, alpha, dalpha = discrete_nelbo_draws(x0, K, gen)
        logits = model(zt, (-torch.log(alpha)).float())
        losses = rb_loss(logits, zt, x0, alpha, dalpha)
        if not torch.isfinite(losses).all():
            raise FloatingPointError("non-finite loss during evaluation (NaN/inf in the model's logits?)")
        keep = torch.ones_like(losses, dtype=torch.bool) if pad_id is None else x0 != pad_id
        total += float((losses.double() * keep).sum())
        count += int(keep.sum())
    nelbo = total / count
    return {"nelbo": nelbo, "ppl": math.exp(nelbo), "tokens": count, "batches": n_batches}


@torch.no_grad()
def validation_nelbo(model: DiT, blocks: Any, batch: int, n_batches: int, rank: int, world: int, seed: int,
                     device: torch.device, pad_id: int | None = None) -> float:
    """This rank's mean NELBO over its validation batches ``i * world + rank`` (``i < n_batches``)
    of ``batch`` blocks each, with a fixed noise stream per batch: every call gives comparable
    values (the caller averages over ranks)."""
    from .steploop import micro_seed

    model.eval()
    K = model.config.vocab_size
    gen = torch.Generator(device=device)
    total, count = 0.0, 0
    n = max(1, min(n_batches, blocks.shape[0] // max(1, batch * world)))
    for i in range(n):
        j = i * world + rank
        x0 = blocks[j * batch:(j + 1) * batch].to(device)
        gen.manual_seed(micro_seed(seed, -1, j, 1))
        zt, alpha, dalpha = discrete_nelbo_draws(x0, K, gen)
        losses = rb_loss(model(zt, (-torch.log(alpha)).float()), zt, x0, alpha, dalpha).double()
        keep = torch.ones_like(losses, dtype=torch.bool) if pad_id is None else x0 != pad_id
        total += float((losses * keep).sum())
        count += int(keep.sum())
    return total / max(1, count)


def check_scorer(name_or_path: str) -> None:
    """Fail now, in one line, if the generative-perplexity scorer's tokenizer cannot be loaded
    (offline hub, wrong folder), rather than at the first validation of a long run."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        where = "" if os.path.exists(name_or_path) else "; offline, the hub cannot be reached: pass a local model folder"
        raise ValueError(f"--val-gen-ppl-model {name_or_path}: cannot be loaded ({type(e).__name__}){where}") from e


def sample_metrics(model: DiT, tokenizer: Any, n: int, steps: int, length: int, seed: int, device: torch.device,
                   gen_ppl_model: str = "") -> dict[str, float]:
    """``n`` samples (``steps`` steps, ancestral final step): their unigram entropy and, with
    ``gen_ppl_model``, their generative perplexity by the public protocol (decoded with their
    special tokens)."""
    from .sampling import SamplerConfig, generate

    ids, _ = generate(model, SamplerConfig(steps=steps, batch=n, length=length, noise_removal="ancestral", seed=seed,
                                           cuda_graph=False), device=device, progress=False)
    rows = ids.cpu().tolist()
    out: dict[str, float] = {"sample_entropy": unigram_entropy(rows)}
    if gen_ppl_model:
        g = generative_perplexity([tokenizer.decode(r) for r in rows], gen_ppl_model, device=device, max_length=length)
        out.update(gen_ppl=g["gen_ppl"], gen_ppl_tokens=g["tokens"])
    return out


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


def unigram_entropy(samples: Sequence[Sequence[int]]) -> float:
    """Mean over samples of the entropy (nats) of each sample's token histogram; repetitive,
    degenerate samples have low entropy."""
    ents = []
    for s in samples:
        counts = torch.bincount(torch.as_tensor(list(s), dtype=torch.long)).double()
        p = counts[counts > 0] / counts.sum()
        ents.append(float(-(p * p.log()).sum()))
    return sum(ents) / max(1, len(ents))


@torch.no_grad()
def generative_perplexity(texts: Sequence[str], model_name_or_path: str, device: str | torch.device = "cpu",
                          max_length: int | None = None, batch_size: int = 8,
                          protocol: str = "public") -> dict[str, float]:
    """Perplexity of ``texts`` under a causal LM, retokenised with the LM's tokenizer (section 8).

    ``protocol="public"`` (the public trainer's rule, step by step): the texts are the samples
    decoded with their special tokens; the LM's tokenizer pads with its EOS when it has no pad
    token, truncates to ``max_length`` (the sample length) and pads each batch; batches of
    ``batch_size`` (a last partial batch is dropped, as there); each row is split into chunks of
    1024 tokens (the public ``eval_context_size`` for GPT-2 models), and within a chunk every
    position predicts the next token with cross-entropy; a target counts when it is not EOS or it
    is the chunk's first EOS (padding is EOS, so only the first one counts); the perplexity is
    ``exp`` of the summed NLL over the summed counts. ``protocol="full"``: every text alone, no
    truncation, windows of the LM's context that predict disjoint ranges, every token counted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if protocol not in ("public", "full"):
        raise ValueError(f"protocol must be public or full, got {protocol!r}")
    tok = AutoTokenizer.from_pretrained(model_name_or_path)
    lm = AutoModelForCausalLM.from_pretrained(model_name_or_path).to(device).eval()
    if protocol == "full":
        return _gen_ppl_full(texts, tok, lm, device, max_length)
    if tok.pad_token is None:
        tok.pad_token, tok.pad_token_id = tok.eos_token, tok.eos_token_id
    eos = tok.eos_token_id
    bs = min(batch_size, len(texts))
    if bs < 1:
        raise ValueError("no samples to score")
    nll, count, used = 0.0, 0.0, 0
    for b in range(len(texts) // bs):
        enc = tok(list(texts[b * bs:(b + 1) * bs]), return_tensors="pt", return_token_type_ids=False,
                  return_attention_mask=True, truncation=True, padding=True, max_length=max_length)
        used += bs
        for ids, mask in zip(enc["input_ids"].split(1024, -1), enc["attention_mask"].split(1024, -1)):
            ids, mask = ids.to(device), mask.to(device)
            logits = lm(ids, attention_mask=mask).logits.float()
            nlls = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            first_eos = (ids == eos).cumsum(-1) == 1
            valid = (first_eos[:, 1:] | (ids[:, 1:] != eos)).double()
            nll += float((nlls.double() * valid).sum())
            count += float(valid.sum())
    if count == 0:
        raise ValueError("no tokens to score: the samples are empty")
    return {"gen_ppl": math.exp(nll / count), "gen_nll": nll / count, "tokens": int(count), "samples_scored": used}


def _gen_ppl_full(texts: Sequence[str], tok: Any, lm: Any, device: str | torch.device,
                  max_length: int | None) -> dict[str, float]:
    ctx = max_length or getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", 1024)
    nll, n = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"][0]
        for s in range(0, max(1, ids.numel() - 1), ctx):     # windows predict disjoint token ranges
            window = ids[s:s + ctx + 1].to(device)
            if window.numel() < 2:
                continue
            logits = lm(window[None, :-1]).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            n += window.numel() - 1
    if n == 0:
        raise ValueError("no tokens to score: the samples are empty")
    return {"gen_ppl": math.exp(nll / n), "gen_nll": nll / n, "tokens": n, "samples_scored": len(texts)}
