"""Reading pickles (``.ckpt``, ``.bin``, ``.pt``) without running code from them.

The public training code saves Lightning checkpoints: ``torch.save`` of a dict that holds,
beside the tensors, its ``hyper_parameters`` (an OmegaConf ``DictConfig`` and the Hugging Face
tokenizer object), callback states and loop states. Unpickling that normally imports those
classes and calls them. :func:`load` instead:

* rebuilds tensors, storages, dtypes and plain containers (``dict``, ``list``, ``tuple``,
  ``set``, numbers, strings, bytes, ``OrderedDict``, ``defaultdict``) as usual;
* turns every object of any other class into an :class:`InertRecord`: the class's dotted name,
  the arguments and state the pickle carried (already plain data), and nothing else. The class is
  never imported and nothing of it is called;
* refuses, without calling them, globals that can run code when called: anything of ``os``,
  ``subprocess``, ``sys``, ``importlib``, ``pickle``, builtins other than the plain containers
  (``eval``, ``exec``, ``getattr``, ``__import__``, ``open``, ...), ``functools``/``operator``
  callables, and any ``torch``/``numpy`` function that is not a tensor or dtype rebuilder.

:func:`to_plain` turns records back into plain data: an OmegaConf container becomes its dict or
list of values, other records ``{"__class__": name, "args": ..., "state": ...}``.
"""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["InertRecord", "UnsafePickleError", "load", "to_plain"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that could run code; nothing was run."""


class InertRecord:
    """An object of a class the unpickler does not trust: ``cls`` (dotted name), ``args``
    (constructor arguments), ``state`` (``__setstate__``/``__dict__`` data), ``items`` and
    ``listitems`` (what dict/list subclasses carried). Behaviourless by construction."""

    cls = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertRecord":
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, listitems=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:       # REDUCE calls the class: nothing more to do
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["listitems"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["listitems"].extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.cls}>"


def _record_class(dotted: str) -> type:
    return type("InertRecord", (InertRecord,), {"cls": dotted, "__module__": __name__})


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} is not allowed in a checkpoint")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects) for record classes and plain containers."""
    if isinstance(cls, type) and issubclass(cls, InertRecord):
        obj = cls()
        if state is not None:
            obj.__setstate__(state)
        return obj
    if cls in (dict, list, tuple, set, frozenset) and base is cls:
        return cls() if state is None else cls(state)
    raise UnsafePickleError(f"copyreg._reconstructor of {cls!r} is not allowed in a checkpoint")


def _newobj(cls: Any, *args: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, InertRecord):
        return cls(*args)
    if cls in _PLAIN_TYPES:
        return cls.__new__(cls, *args)
    raise UnsafePickleError(f"copyreg.__newobj__ of {cls!r} is not allowed in a checkpoint")


_PLAIN_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                   "bytearray", "bool", "slice", "range", "object")
_PLAIN_TYPES = tuple(getattr(builtins, n) for n in _PLAIN_BUILTINS)

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("collections", "defaultdict"): __import__("collections").defaultdict,
    ("_codecs", "encode"): _latin1_encode,
    ("codecs", "encode"): _latin1_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
}
for _n, _t in zip(_PLAIN_BUILTINS, _PLAIN_TYPES):
    _ALLOWED[("builtins", _n)] = _ALLOWED[("__builtin__", _n)] = _t
# protocol-2 pickles name some builtins by their Python 2 names
_ALLOWED.update({("__builtin__", "long"): int, ("__builtin__", "unicode"): str, ("__builtin__", "xrange"): range})

# Globals of these modules can run code when called during unpickling: refused, never resolved.
_FORBIDDEN_ROOTS = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "socket", "shutil", "importlib", "runpy",
    "pickle", "_pickle", "marshal", "code", "codeop", "ctypes", "types", "functools", "operator", "io", "_io",
    "pathlib", "tempfile", "webbrowser", "pty", "signal", "multiprocessing", "threading", "_thread", "asyncio",
    "torch", "numpy", "dill", "cloudpickle", "pydoc", "inspect", "copyreg", "copy_reg", "_codecs", "codecs",
    "collections", "platform", "urllib", "http", "requests", "zipimport", "pkgutil", "site", "sysconfig",
    "timeit", "trace", "pdb", "bdb", "cProfile", "profile", "gc", "weakref", "ast", "compileall", "py_compile",
    "glob", "fnmatch", "zipfile", "tarfile", "gzip", "bz2", "lzma", "logging", "smtplib", "ftplib", "telnetlib",
    "xmlrpc", "sqlite3", "dbm", "shelve", "uuid", "random", "secrets", "hashlib", "hmac", "select", "selectors",
    "mmap", "fcntl", "resource", "grp", "pwd", "termios", "tty", "readline", "rlcompleter", "atexit",
    "contextlib", "abc", "dataclasses", "enum", "typing_extensions", "numexpr", "pandas", "scipy", "sympy",
    "jinja2", "yaml", "ruamel", "jsonpickle", "joblib", "torchvision", "lightning_fabric", "setuptools", "pip",
})
_INERT_TYPING = frozenset({"Any", "Optional", "Union", "List", "Dict", "Tuple", "Set"})


class _Unpickler(pickle.Unpickler):
    seen: set[str] = set()          # the record classes of the load under way (torch.load subclasses us)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
            return getattr(torch, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numpy_scalar
        if module == "numpy" and name == "dtype":
            import numpy as np

            return np.dtype
        if module == "typing" and name in _INERT_TYPING:     # type annotations carried as values (OmegaConf)
            _Unpickler.seen.add(f"{module}.{name}")
            return _record_class(f"{module}.{name}")()
        if module.split(".")[0] in _FORBIDDEN_ROOTS:
            raise UnsafePickleError(f"forbidden global {module}.{name} in the pickle (it could run code; "
                                    "nothing was run)")
        dotted = f"{module}.{name}"
        _Unpickler.seen.add(dotted)
        return _record_class(dotted)


def _numpy_scalar(dtype: Any, data: bytes | None = None) -> Any:
    """numpy's scalar rebuild from a dtype and raw bytes (no code from the file)."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("a numpy scalar of an object dtype is not allowed in a checkpoint")
    return np.frombuffer(data, dtype=dtype)[0]


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` and ``load`` (legacy files)."""

    __name__ = "duo_fast.io.safe_pickle"
    Unpickler = _Unpickler

    @staticmethod
    def load(f: Any, **kw: Any) -> Any:
        return _Unpickler(f, **kw).load()


def load(path: str | Path) -> tuple[Any, list[str]]:
    """``torch.load`` of ``path`` on the CPU with the inert-record unpickler. Returns
    ``(object, classes)``: the dotted names of the classes turned into records. Raises
    :class:`UnsafePickleError` for a code-running global (nothing of it runs)."""
    _Unpickler.seen = set()
    obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    return obj, sorted(_Unpickler.seen)


_OMEGACONF_SKIP = ("_parent", "_metadata", "_flags_cache")


def to_plain(x: Any, _depth: int = 0, _active: set[int] | None = None) -> Any:
    """Records to plain data (see the module docstring); cycles and depth beyond 64 become None."""
    active = _active if _active is not None else set()
    if _depth > 64 or id(x) in active:
        return None
    if isinstance(x, (str, bytes, int, float, bool, type(None), torch.Tensor)):
        return x
    active.add(id(x))
    try:
        if isinstance(x, InertRecord):
            return _record_to_plain(x, _depth, active)
        if isinstance(x, dict):
            return {k: to_plain(v, _depth + 1, active) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(to_plain(v, _depth + 1, active) for v in x) if isinstance(x, list) else \
                tuple(to_plain(v, _depth + 1, active) for v in x)
        return x
    finally:
        active.discard(id(x))


def _record_to_plain(r: InertRecord, depth: int, active: set[int]) -> Any:
    state = r.state
    if r.cls.startswith("omegaconf."):
        content = state.get("_content") if isinstance(state, dict) else None
        if isinstance(state, dict) and "_val" in state:                      # a value node
            return to_plain(state["_val"], depth + 1, active)
        if isinstance(content, dict):
            return {k: to_plain(v, depth + 1, active) for k, v in content.items()}
        if isinstance(content, (list, tuple)):
            return [to_plain(v, depth + 1, active) for v in content]
        if content is None and isinstance(state, dict) and "_content" in state:
            return None
    out: dict[str, Any] = {"__class__": r.cls}
    if r.args:
        out["args"] = to_plain(list(r.args), depth + 1, active)
    if state is not None:
        if isinstance(state, dict):
            state = {k: v for k, v in state.items() if k not in _OMEGACONF_SKIP}
        out["state"] = to_plain(state, depth + 1, active)
    if r.items:
        out["items"] = to_plain(r.items, depth + 1, active)
    if r.listitems:
        out["listitems"] = to_plain(r.listitems, depth + 1, active)
    return out
