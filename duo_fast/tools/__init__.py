"""Tools that read the kernels without running them on a GPU: the static H100 cost model
(``python -m duo_fast.tools.cost_model``) and the sm_90a compile check of every kernel
configuration (``python -m duo_fast.tools.compile_check``).

May import: ``duo_fast.kernels``, ``duo_fast.core``, ``duo_fast.ops``, ``duo_fast.model``.
"""
