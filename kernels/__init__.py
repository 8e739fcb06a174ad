"""Triton kernels of duo_fast, installed as ``duo_fast.kernels`` (never as a top-level
``kernels`` package: a PyPI package of that name exists and transformers probes for it).

Convention: one module per operator, holding its ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel``
JIT functions and launchers that check shapes and choose block sizes. Kernels never import
``duo_fast``; the dispatch layer in ``duo_fast/ops`` imports them.
"""
