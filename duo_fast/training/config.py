"""The options every run of the training harness has (``duo-fast train`` and ``duo-fast distill``),
declared once: :class:`RunConfig`. An objective's config subclasses it, adds its own fields and
sets its recipe's defaults of the common ones with :func:`recipe` (the help, choices and checks
stay those declared here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from duo_fast.core.options import option

__all__ = ["RunConfig", "recipe"]


@dataclass
class RunConfig:
    """The fields ``train`` and ``distill`` share; the defaults are the training recipe's."""

    dataset: str = option("bundled", "bundled, openwebtext, wikitext103, wikitext2, lm1b (padded sentences, the "
                                     "public data=lm1b), lm1b-wrap (wrapped), or text:PATH (.txt/.jsonl)")
    tokenizer: str = option("bundled", "'bundled' (BPE trained on the bundled corpus), a local folder or a hub name")
    tokenizer_vocab: int = option(4096, "vocabulary size of the bundled BPE tokenizer")
    length: int = option(1024, "sequence length L of the training blocks")
    batch_size: int = option(512, "sequences per optimizer step")
    steps: int = option(1_000_000, "optimizer steps")
    lr: float = option(3e-4, "AdamW learning rate after warm-up")
    warmup_steps: int = option(2500, "linear warm-up steps (the first update has learning rate 0, as in the public "
                                     "trainer)")
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)")
    ema: float = option(0.9999, "EMA decay of the weights exported for sampling (0 disables the EMA)")
    seed: int = option(0, "random seed (data order, noise, initialisation)")
    device: str = option("auto", "auto (cuda when available), cpu or cuda[:N]")
    zero_stage: int = option(0, "0: plain PyTorch in one process; 1, 2, 3: DeepSpeed ZeRO stage (any number of "
                                "processes, launched by torchrun or deepspeed)", choices=(0, 1, 2, 3))
    micro_batch_size: int = option(0, "sequences per rank per forward/backward (0: batch_size / world size); "
                                      "batch_size must be a multiple of micro_batch_size x world size")
    save_every: int = option(0, "steps between resumable checkpoints in OUT/checkpoints (0: only at the end and "
                                "on SIGTERM/SIGINT)")
    resume: bool = option(True, "continue the run in OUT from its newest complete checkpoint (a different "
                                "configuration is refused); off: a non-empty OUT is refused")
    overwrite: bool = option(False, "use OUT even if it holds another run: the old folder is moved aside to "
                                    "OUT.old-TIME, never deleted")
    keep_checkpoints: int = option(2, "complete checkpoints kept in OUT/checkpoints (the newest N)")
    log_every: int = option(25, "steps between log lines in the JSONL log (the only steps that read from the device)")
    val_batches: int = option(4, "validation batches for the NELBO (the same fixed batches and noise at every "
                                 "validation)")
    val_every: int = option(5000, "steps between validations (the public val_check_interval): NELBO of the EMA "
                                  "weights, logged, and the best weights exported to OUT/best (0: only at the end)")
    val_samples: int = option(0, "samples drawn at each validation for their unigram entropy (and generative "
                                 "perplexity with val_gen_ppl_model); 0: none")
    val_sample_steps: int = option(1000, "sampling steps of those samples (the public sampling.steps)")
    val_gen_ppl_model: str = option("", "causal LM (hub name or local folder; the public code uses gpt2-large) that "
                                        "scores the validation samples, public protocol")
    val_fraction: float = option(0.05, "share of the documents of a local text:PATH data set held out for "
                                       "validation (a fixed, seeded choice; never trained on)")
    wandb: bool = option(False, "also log to Weights & Biases (project wandb_project) when wandb is installed")
    wandb_project: str = option("duo-fast", "W&B project of --wandb")
    out: str = option("runs/duo", "output folder: log.jsonl, checkpoints/, export/ (HF layout), best/ and "
                                  "summary.json")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError(f"--batch-size and --steps must be >= 1; got {self.batch_size}, {self.steps}")
        if self.val_batches < 1:
            raise ValueError(f"--val-batches must be >= 1, got {self.val_batches}")
        if self.val_every < 0 or self.val_samples < 0 or self.val_sample_steps < 1:
            raise ValueError(f"--val-every and --val-samples must be >= 0 and --val-sample-steps >= 1; got "
                             f"{self.val_every}, {self.val_samples}, {self.val_sample_steps}")
        if self.val_gen_ppl_model and self.val_samples < 1:
            raise ValueError("--val-gen-ppl-model needs --val-samples >= 1 (the samples it scores)")
        if self.tokenizer == "bundled" and self.tokenizer_vocab < 300:
            raise ValueError(f"--tokenizer-vocab must be >= 300 (256 bytes, 4 special tokens and merges), "
                             f"got {self.tokenizer_vocab}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0 (no DeepSpeed), 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch_size < 0 or self.save_every < 0:
            raise ValueError("micro_batch_size and save_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {self.log_every}")


def recipe(name: str, default: Any, help: str | None = None) -> Any:
    """This command's default of the :class:`RunConfig` field ``name`` (its help, unless given,
    and its choices stay the ones declared there)."""
    base = RunConfig.__dataclass_fields__[name]
    return field(default=default, metadata={**base.metadata, **({"help": help} if help else {})})
