"""Evaluation: the discrete NELBO (one function for ``duo-fast eval``, training validation and
distillation validation) and generative perplexity of samples under a causal LM (``nelbo``,
``gen_ppl``).

May import: ``duo_fast.core``, ``duo_fast.ops``, ``duo_fast.model``, ``duo_fast.data``,
``duo_fast.io``, ``duo_fast.sampling``.
"""
