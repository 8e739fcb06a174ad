"""Triton kernels of duo_fast, installed as ``duo_fast.kernels`` (never as a top-level
``kernels`` package: a PyPI package of that name exists and transformers imports it).

Convention: one module per operator, holding its ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel``
JIT functions and launchers that check shapes and choose block sizes. Kernels never import
``duo_fast``; the operators in ``duo_fast/ops`` import them.

From the repository root (where ``python -m duo_fast.cli`` and the README's launchers run) the
current folder is on ``sys.path``, so ``import kernels`` would find this folder. Imported under
that name, this file hands the name to the installed package called ``kernels`` instead (or
raises the ImportError there would be without this folder): the repository never shadows it.
"""

if __name__ == "kernels":                           # imported as top-level ``kernels``: not ours
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ImportError("No module named 'kernels' (the repository's kernels/ folder is duo_fast.kernels)",
                          name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module                # the import statement returns sys.modules["kernels"]
    _spec.loader.exec_module(_module)
