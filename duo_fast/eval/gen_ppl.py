"""Generative perplexity of samples under a causal LM (the public protocol or every token), the
samples' unigram entropy, and the validation samples of training and distillation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from duo_fast.model import DiT

__all__ = ["check_scorer", "sample_metrics", "unigram_entropy", "generative_perplexity"]


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
    from duo_fast.sampling.loop import SamplerConfig, generate

    ids, _ = generate(model, SamplerConfig(steps=steps, batch=n, length=length, noise_removal="ancestral", seed=seed,
                                           cuda_graph=False), device=device, progress=False)
    rows = ids.cpu().tolist()
    out: dict[str, float] = {"sample_entropy": unigram_entropy(rows)}
    if gen_ppl_model:
        g = generative_perplexity([tokenizer.decode(r) for r in rows], gen_ppl_model, device=device, max_length=length)
        out.update(gen_ppl=g["gen_ppl"], gen_ppl_tokens=g["tokens"])
    return out


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
