"""Evaluation: validation / zero-shot perplexity from the RB NELBO (docs/math.md sections 3, 8),
and generative perplexity of samples under a causal LM with the samples' unigram entropy.

Perplexity: blocks of the model's length (documents detokenised, wrapped with BOS/EOS); per
batch, stratified times, the log-linear schedule, ``z_t ~ q_t`` and the per-token RB loss; the
reported value is ``exp`` of the mean over all tokens. It is an upper bound on the true
perplexity (a NELBO, one Monte-Carlo draw of ``t`` per sequence).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import reference as ref
from .data import blocks_from_documents, check_tokenizer_vocab, load_text_documents
from .model import DiT
from .ops import rb_loss

__all__ = ["EVAL_DATASETS", "DETOKENIZERS", "eval_documents", "discrete_nelbo_draws", "evaluate_nelbo",
           "check_tokenizer_vocab", "unigram_entropy", "generative_perplexity"]


# ---------------------------------------------------------------------------------------------
# Detokenisers: undo the tokenisation artefacts of each corpus before our tokenizer sees it.
# ---------------------------------------------------------------------------------------------

def wikitext_detokenize(s: str) -> str:
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([.,;:!?)\]}'])", r"\1", s)           # no space before closing punctuation
    s = re.sub(r"([(\[{]) ", r"\1", s)                  # none after opening brackets
    s = re.sub(r"= = = (.*?) = = =", r"=== \1 ===", s)
    s = re.sub(r"= = (.*?) = =", r"== \1 ==", s)
    s = s.replace(" n't", "n't").replace(" 's", "'s")
    return s.replace("\n ", "\n").strip()


def ptb_detokenize(s: str) -> str:
    s = s.replace(" 's", "'s").replace(" n't", "n't").replace(" 're", "'re").replace(" 've", "'ve")
    s = s.replace(" 'm", "'m").replace(" 'll", "'ll").replace(" 'd", "'d").replace("<unk>", "?")
    s = s.replace(" N ", " 1 ").replace("\\/", "/").replace("$ ", "$")
    return re.sub(r" ([.,;:!?%])", r"\1", s).strip()


def lm1b_detokenize(s: str) -> str:
    s = re.sub(r" ([.,;:!?%)])", r"\1", s).replace("( ", "(").replace(" 's", "'s").replace(" n't", "n't")
    return s.replace(" - ", "-").strip()


def lambada_detokenize(s: str) -> str:
    return s.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'").strip()


def scientific_detokenize(s: str) -> str:
    s = re.sub(r" ([.,;:!?)\]])", r"\1", s)
    s = re.sub(r"([(\[]) ", r"\1", s)
    return s.replace("\n ", "\n").strip()


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenize, "ptb": ptb_detokenize, "lm1b": lm1b_detokenize,
    "lambada": lambada_detokenize, "scientific": scientific_detokenize,
}

# name -> (hub path, config, split, text field, detokeniser)
EVAL_DATASETS: dict[str, tuple[str, str | None, str, str, str | None]] = {
    "openwebtext-valid": ("openwebtext", None, "validation", "text", None),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "test", "text", "wikitext"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text", "wikitext"),
    "ptb": ("ptb_text_only", None, "test", "sentence", "ptb"),
    "lm1b": ("lm1b", None, "test", "text", "lm1b"),
    "lambada": ("EleutherAI/lambada_openai", "en", "test", "text", "lambada"),
    "ag_news": ("ag_news", None, "test", "text", None),
    "pubmed": ("scientific_papers", "pubmed", "test", "article", "scientific"),
    "arxiv": ("scientific_papers", "arxiv", "test", "article", "scientific"),
}


def eval_documents(name: str) -> list[str]:
    """Detokenised documents of an evaluation set, or of a local file ``text:PATH``."""
    if name.startswith("text:") or name == "bundled":
        return load_text_documents(name, "validation" if name == "bundled" else "all")
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown evaluation dataset {name!r}; choose {', '.join(EVAL_DATASETS)} or text:PATH")
    if name == "openwebtext-valid":
        return load_text_documents("openwebtext", "validation")
    import datasets

    from .data import hub_error

    path, config, split, field, detok = EVAL_DATASETS[name]
    try:
        ds = datasets.load_dataset(path, config, split=split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        raise hub_error(name, e) from e
    docs = [t for t in ds[field] if t and t.strip()]
    return [DETOKENIZERS[detok](d) for d in docs] if detok else docs


def discrete_nelbo_draws(x0: Tensor, vocab_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The random part of one NELBO evaluation batch: ``(z_t, alpha_t, dalpha_t)`` with
    stratified ``t`` and the log-linear schedule (float64 alphas, one per sequence)."""
    t = ref.stratified_times(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64)
    alpha, dalpha = ref.alpha_loglinear(t)
    return ref.sample_qt(x0, alpha, vocab_size, generator=generator), alpha, dalpha


@torch.no_grad()
def evaluate_nelbo(model: DiT, blocks: Tensor, batch_size: int = 16, seed: int = 0, device: str | torch.device = "cpu",
                   max_batches: int | None = None, progress: bool = True) -> dict[str, float]:
    """Mean per-token NELBO (nats) and its perplexity over ``blocks`` (N, L) int64."""
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
        total += float(losses.double().sum())
        count += losses.numel()
    nelbo = total / count
    return {"nelbo": nelbo, "ppl": math.exp(nelbo), "tokens": count, "batches": n_batches}


def eval_blocks(name: str, tokenizer: Any, length: int, max_docs: int | None = None) -> Tensor:
    docs = eval_documents(name)
    if max_docs:
        docs = docs[:max_docs]
    return blocks_from_documents(tokenizer, docs, length)


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
                          max_length: int | None = None) -> dict[str, float]:
    """Perplexity of ``texts`` under a causal LM (retokenised with its own tokenizer; each text
    scored from its first token, in windows of the LM's context), as in section 8."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_name_or_path)
    lm = AutoModelForCausalLM.from_pretrained(model_name_or_path).to(device).eval()
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
    return {"gen_ppl": math.exp(nll / n), "gen_nll": nll / n, "tokens": n}
