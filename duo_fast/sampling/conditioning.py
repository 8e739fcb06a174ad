"""Conditioning of the sampler: prompts (a prefix kept as the start of every sample) and infill
templates (``"The [GAP:12] of the [GAP:5]."``: the text kept, the gaps sampled), turned into the
known ids and the mask the sampling loop clamps after every draw.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

__all__ = ["infill_pieces", "condition_groups", "known_positions"]

_GAP = re.compile(r"\[GAP:([^\]]*)\]")


def infill_pieces(template: str) -> list[str | int]:
    """``"The [GAP:12] of the [GAP:5]."`` -> ["The", 12, " of the", 5, "."]; ``ValueError`` (one
    line naming ``--infill``) for a bad template."""
    pieces: list[str | int] = []
    pos = 0
    for m in _GAP.finditer(template):
        if m.start() > pos:
            pieces.append(template[pos:m.start()])
        if not m.group(1).isdigit() or int(m.group(1)) < 1:
            raise ValueError(f"--infill: a gap is written [GAP:N] with N >= 1 tokens, got {m.group(0)!r}")
        pieces.append(int(m.group(1)))
        pos = m.end()
    if pos < len(template):
        pieces.append(template[pos:])
    if "[GAP" in "".join(p for p in pieces if isinstance(p, str)):
        raise ValueError("--infill: a gap is written [GAP:N] with N >= 1 tokens (a [GAP marker is malformed)")
    if not any(isinstance(p, int) for p in pieces):
        raise ValueError("--infill: the template has no [GAP:N]; use --prompt to condition on a text without gaps")
    return pieces


def condition_groups(tokenizer: Any, length: int, prompts: list[str] | None = None, infill: str | None = None,
                     bos: bool = True, source: str = "prompt") -> list[dict]:
    """The conditioning of each group of samples: ``[{"prefix": ids, "mask": bools or None, "row":
    JSONL fields}]``; one unconditional group without ``prompts`` or ``infill``. ``ValueError``
    (one line) for an empty prompt list, a missing tokenizer or a prompt longer than ``length``."""
    if prompts is None and infill is None:
        return [{"prefix": None, "mask": None, "row": {}}]
    if tokenizer is None:
        raise ValueError("--prompt/--prompt-file/--infill need a tokenizer: pass --tokenizer")
    head = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    groups = []
    if infill is not None:
        ids, mask = list(head), [True] * len(head)
        for piece in infill_pieces(infill):
            new = encode(piece) if isinstance(piece, str) else [0] * piece
            ids += new
            mask += [isinstance(piece, str)] * len(new)
        groups.append({"prefix": ids, "mask": mask, "row": {"template": infill}})
    else:
        if not prompts:
            raise ValueError(f"{source}: no prompts (one per line)")
        groups = [{"prefix": head + encode(t), "mask": None, "row": {"prompt": t}} for t in prompts]
    for g in groups:
        if len(g["prefix"]) > length:
            what = "--infill template" if infill is not None else "prompt"
            raise ValueError(f"{what} is {len(g['prefix'])} tokens, longer than the sampled length {length} "
                             f"(see --length)")
    return groups


def known_positions(prefix: Tensor | None, known_mask: Tensor | None, batch: int, length: int, K: int,
                  device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """(known ids (B, L) int64, mask (B, L) bool) on ``device``, or (None, None) without conditioning."""
    if prefix is None:
        if known_mask is not None:
            raise ValueError("known_mask needs prefix (the template whose masked positions are kept)")
        return None, None
    prefix = torch.as_tensor(prefix)
    if prefix.dtype.is_floating_point or prefix.dtype == torch.bool or prefix.dim() not in (1, 2):
        raise ValueError(f"prefix must be integer token ids of shape (P,) or (batch, P), got {prefix.dtype} "
                         f"{tuple(prefix.shape)}")
    if prefix.dim() == 2 and prefix.shape[0] != batch:
        raise ValueError(f"prefix has {prefix.shape[0]} rows for a batch of {batch}")
    P = prefix.shape[-1]
    if P > length:
        raise ValueError(f"prefix has {P} tokens, more than the sampled length {length}")
    ids = prefix.detach().to("cpu", torch.int64).numpy()        # checked on the host, once, before the loop
    if P and (ids.min() < 0 or ids.max() >= K):
        raise ValueError(f"prefix ids must be in [0, {K}) (the model's vocabulary)")
    m = torch.ones(prefix.shape, dtype=torch.bool) if known_mask is None else torch.as_tensor(known_mask)
    if m.dtype != torch.bool or m.shape != prefix.shape:
        raise ValueError(f"known_mask must be bool with the shape of prefix {tuple(prefix.shape)}, got {m.dtype} "
                         f"{tuple(m.shape)}")
    known = torch.zeros((batch, length), dtype=torch.int64)
    mask = torch.zeros((batch, length), dtype=torch.bool)
    known[:, :P] = prefix.to("cpu", torch.int64)
    mask[:, :P] = m.cpu()
    return known.to(device), mask.to(device)
