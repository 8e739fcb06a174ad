"""Benchmarks: ``duo-fast bench {kernels,sample,train,all}`` (``suite``) and the helpers every
bench entry shares (``common``: timing, peak memory, tables, JSON). The per-issue scripts in the
repository's ``bench/`` folder use the same helpers."""
