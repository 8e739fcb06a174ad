"""Benchmarks: ``duo-fast bench {kernels,sample,train,all}`` (``suite``), the public-style
baselines it times ours against (``reference_paths``), and the helpers every bench entry shares
(``common``: timing, peak memory, tables, JSON). The per-issue scripts in the repository's
``bench/`` folder use the same helpers; nothing else benchmark-only lives in the package.

May import every layer but ``duo_fast.cli``, the oracle ``duo_fast.reference`` included (the
baselines compute what the public code computes).
"""
