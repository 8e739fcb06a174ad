"""The Diffusion Transformation operator ``T`` (docs/math.md section 4) as an interpolation table.

``p(gamma) = P(argmax(at e_x + st eps) = x) = int phi(z - mu) Phi(z)^(K-1) dz`` with
``mu = exp(-gamma/2)``, and ``T(gamma) = (K p - 1)/(K - 1)`` is the USDM ``alpha``.

The table stores ``q = 1 - p`` and ``dq/dgamma`` at ``num_points`` evenly spaced ``gamma``. It is built
vectorised with one fixed Gauss-Legendre rule shared by all points (no per-point adaptive
quadrature) and read back by cubic Hermite interpolation, which also gives the derivative
analytically. Three choices keep the quadrature accurate (section 4):

* ``y = z - mu``: ``p = int phi(y) F(y + mu) dy`` with ``F(z) = exp((K-1) log Phi(z))``;
* ``q = 1 - p`` is integrated directly (``1 - F = -expm1(log F)``), which keeps its relative
  precision where ``p`` is within 1e-16 of 1, so the interpolated derivative does too;
* integration by parts turns the derivative's ``int y phi(y) F(y + mu) dy``, which cancels
  to a tiny number when ``p`` is close to 1, into ``int phi(y) F'(y + mu) dy`` with
  ``F' = (K-1) phi Phi^(K-2) >= 0``; so ``dp/dgamma = -(mu/2) int phi(y) F'(y + mu) dy``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from scipy.special import log_ndtr
from torch import Tensor

from duo_fast.ops import backends

__all__ = ["TTable", "p_and_derivative", "q_and_derivative", "lookup_backend"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _gauss_legendre_panels(lo: float, hi: float, panels: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(lo, hi, panels + 1)
    half = 0.5 * np.diff(edges)[:, None]
    mid = 0.5 * (edges[1:] + edges[:-1])[:, None]
    return (mid + half * nodes).ravel(), (half * weights).ravel()


# y in [-10, 10]: phi(10) ~ 8e-23, far below the 1e-9 accuracy asked of the table. Panels of
# width 0.25 with 12 nodes resolve F's sharpest step (width ~ 1/sqrt(2 log K)) to ~1e-15.
_Y, _W = _gauss_legendre_panels(-10.0, 10.0, panels=80, order=12)
_LOG_PHI_Y = -0.5 * _Y ** 2 - _LOG_SQRT_2PI


def q_and_derivative(gamma: np.ndarray, vocab_size: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``q = 1 - p(gamma)`` and ``dq/dgamma = -dp/dgamma`` (float64 numpy, any shape of gamma).

    ``q`` is integrated directly as ``int phi(y) (1 - F(y + mu)) dy`` so that it keeps its
    relative precision where ``p`` is within 1e-16 of 1 (the table interpolates ``q``).
    """
    g = np.asarray(gamma, dtype=np.float64)
    flat = g.ravel()
    q = np.empty_like(flat)
    dq = np.empty_like(flat)
    km1 = vocab_size - 1
    for s in range(0, flat.size, chunk):
        mu = np.exp(-flat[s:s + chunk] / 2)[:, None]
        z = _Y[None, :] + mu                                    # (chunk, nodes)
        log_cdf = log_ndtr(z)
        one_minus_f = -np.expm1(km1 * log_cdf)                  # 1 - F(z), F = Phi^(K-1)
        log_fprime = math.log(km1) + (km1 - 1) * log_cdf - 0.5 * z * z - _LOG_SQRT_2PI
        q[s:s + chunk] = (np.exp(_LOG_PHI_Y)[None, :] * one_minus_f) @ _W
        dq[s:s + chunk] = (mu[:, 0] / 2) * (np.exp(_LOG_PHI_Y[None, :] + log_fprime) @ _W)
    return q.reshape(g.shape), dq.reshape(g.shape)


def p_and_derivative(gamma: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``p(gamma) = P(argmax w = x)`` and ``dp/dgamma`` (float64 numpy, any shape of gamma)."""
    q, dq = q_and_derivative(gamma, vocab_size)
    return 1.0 - q, -dq


def _default_cache_dir() -> Path:
    root = os.environ.get("DUO_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "duo_fast"))
    return Path(root) / "ttables"


def _hermite_lookup(gamma: Tensor, q: Tensor, dq: Tensor, gamma_min: float, gamma_max: float,
                    vocab_size: int) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch cubic Hermite lookup of ``q = 1 - p`` from its value and derivative tables:
    returns ``(alpha, dalpha/dgamma)`` in gamma's dtype, with ``alpha = 1 - K q / (K - 1)``."""
    n = q.shape[0]
    h = (gamma_max - gamma_min) / (n - 1)
    inv_h = (n - 1) / (gamma_max - gamma_min)
    pos = (gamma.to(q.dtype) - gamma_min) * inv_h
    idx = torch.nan_to_num(pos, nan=0.0).floor().clamp(0, n - 2).long()   # out-of-range rows become NaN below
    s = pos - idx
    # Same arithmetic, in the same order, as csrc/ttable_lookup.h (the op must match to 1e-12).
    p0, p1 = q[idx], q[idx + 1]
    m0, m1 = dq[idx] * h, dq[idx + 1] * h
    s2, s3 = s * s, s * s * s
    val = (2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * m0 + (-2 * s3 + 3 * s2) * p1 + (s3 - s2) * m1
    der = ((6 * s2 - 6 * s) * p0 + (3 * s2 - 4 * s + 1) * m0 + (-6 * s2 + 6 * s) * p1 + (3 * s2 - 2 * s) * m1) * inv_h
    scale = vocab_size / (vocab_size - 1)
    g = gamma.to(q.dtype)
    inside = (g >= gamma_min) & (g <= gamma_max)          # False for NaN too: NaN out, never a clamp
    nan = torch.full_like(val, float("nan"))
    alpha = torch.where(inside, 1.0 - scale * val, nan)
    dalpha = torch.where(inside, -scale * der, nan)
    return alpha.to(gamma.dtype), dalpha.to(gamma.dtype)


def lookup_backend(device: torch.device, impl: str = "auto") -> str:
    """``"cpp"`` (the custom op ``torch.ops.duo_fast.ttable_lookup``) or ``"torch"`` for a
    lookup on ``device``, as the backend registry decides (``duo_fast.ops.backends``): ``impl``
    (or ``DUO_FAST_TTABLE_IMPL``) forces one; a forced ``cpp`` that is not available raises,
    ``auto`` falls back with a one-time warning. Records the choice."""
    return backends.run_impl("ttable_lookup", device, impl)


class _AlphaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gamma: Tensor, table: "TTable") -> Tensor:  # type: ignore[override]
        alpha, dalpha = table.alpha_and_derivative(gamma, check=False, impl="torch")
        ctx.save_for_backward(dalpha)
        return alpha

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (dalpha,) = ctx.saved_tensors
        return grad * dalpha, None


class TTable:
    """Interpolation table of ``T`` for one vocabulary size and ``gamma`` range.

    Build with :meth:`build` (cached per ``(K, range, points)`` in memory and on disk), then call
    :meth:`alpha`. The tables hold ``q = 1 - p`` and ``dq/dgamma`` in float64 and are copied to
    the device of a query on first use there.
    """

    _memory: ClassVar[dict[tuple[int, float, float, int], "TTable"]] = {}

    def __init__(self, vocab_size: int, gamma_min: float, gamma_max: float, q: Tensor, dq: Tensor,
                 build_seconds: float = 0.0) -> None:
        if q.shape != dq.shape or q.dim() != 1 or q.shape[0] < 2:
            raise ValueError("TTable needs 1-d value and derivative tables of equal length >= 2")
        if not gamma_min < gamma_max:
            raise ValueError(f"TTable needs gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        self.vocab_size = int(vocab_size)
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.num_points = int(q.shape[0])
        self.build_seconds = build_seconds
        self._q = {q.device: q.double()}
        self._dq = {dq.device: dq.double()}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, vocab_size: int, gamma_min: float = -5.0, gamma_max: float = -1.0,
              num_points: int = 100_000, cache: bool = True, cache_dir: str | Path | None = None) -> "TTable":
        """Tabulate ``q = 1 - p`` and ``dq/dgamma`` at ``num_points`` evenly spaced gamma in
        ``[gamma_min, gamma_max]`` for vocabulary size ``vocab_size`` (>= 2)."""
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {num_points}")
        key = (int(vocab_size), float(gamma_min), float(gamma_max), int(num_points))
        if cache and key in cls._memory:
            return cls._memory[key]
        path = None
        if cache:
            d = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
            path = d / f"T_K{vocab_size}_{gamma_min:g}_{gamma_max:g}_{num_points}.npz"
            if path.exists():
                try:
                    table = cls.load(path)
                    cls._memory[key] = table
                    return table
                except (ValueError, OSError, KeyError):
                    pass  # a damaged cache entry is rebuilt below
        import time

        t0 = time.perf_counter()
        grid = np.linspace(gamma_min, gamma_max, num_points)
        q, dq = q_and_derivative(grid, vocab_size)
        table = cls(vocab_size, gamma_min, gamma_max, torch.from_numpy(q), torch.from_numpy(dq),
                    build_seconds=time.perf_counter() - t0)
        if cache:
            cls._memory[key] = table
            if path is not None:
                try:
                    table.save(path)
                except OSError:
                    pass  # a read-only cache directory only costs a rebuild next time
        return table

    def save(self, path: str | Path) -> None:
        """Write the table and its metadata to ``path`` (``.npz``), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"vocab_size": self.vocab_size, "gamma_min": self.gamma_min,
                           "gamma_max": self.gamma_max, "num_points": self.num_points, "format": 1})
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, q=self.q().cpu().numpy(), dq=self.dq().cpu().numpy(), meta=np.array(meta))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "TTable":
        """Read a table written by :meth:`save`; raises ``ValueError`` if it is inconsistent."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            q, dq = z["q"], z["dq"]
        if q.shape != (meta["num_points"],) or dq.shape != q.shape:
            raise ValueError(f"T table {path} is corrupt: {q.shape} points, metadata says {meta['num_points']}")
        return cls(meta["vocab_size"], meta["gamma_min"], meta["gamma_max"], torch.from_numpy(q), torch.from_numpy(dq))

    # -- lookup ------------------------------------------------------------------------------------
    def q(self, device: torch.device | str = "cpu") -> Tensor:
        """The ``1 - p`` table, (num_points,) float64, on ``device``."""
        device = torch.device(device)
        if device not in self._q:
            self._q[device] = next(iter(self._q.values())).to(device)
        return self._q[device]

    def dq(self, device: torch.device | str = "cpu") -> Tensor:
        """The ``d(1 - p)/dgamma`` table, (num_points,) float64, on ``device``."""
        device = torch.device(device)
        if device not in self._dq:
            self._dq[device] = next(iter(self._dq.values())).to(device)
        return self._dq[device]

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if this table was built for another vocabulary size than ``vocab_size``."""
        if vocab_size != self.vocab_size:
            raise ValueError(f"T table was built for vocab_size={self.vocab_size}, but the model has "
                             f"vocab_size={vocab_size}; build one with TTable.build({vocab_size}, ...)")

    def check_range(self, gamma: Tensor) -> None:
        """Assert ``gamma_min <= gamma <= gamma_max`` without a host synchronisation (an
        asynchronous device assert on accelerators, an immediate error on CPU)."""
        ok = ((gamma >= self.gamma_min) & (gamma <= self.gamma_max)).all()
        torch._assert_async(ok, f"gamma outside the T table's range [{self.gamma_min}, {self.gamma_max}] "
                                f"(NaN included); build a table with a wider range")

    def alpha_and_derivative(self, gamma: Tensor, check: bool = True, impl: str = "auto") -> tuple[Tensor, Tensor]:
        """``(alpha, dalpha/dgamma)`` at ``gamma`` (any shape, float32/float64), no autograd.
        With ``check=False`` a gamma outside the range gives NaN instead of an error."""
        if check:
            self.check_range(gamma)
        dev = gamma.device
        if lookup_backend(dev, impl) == "cpp":
            return torch.ops.duo_fast.ttable_lookup(gamma.detach(), self.q(dev), self.dq(dev), self.gamma_min,
                                                    self.gamma_max, self.vocab_size)
        return _hermite_lookup(gamma.detach(), self.q(dev), self.dq(dev), self.gamma_min, self.gamma_max,
                               self.vocab_size)

    def alpha(self, gamma: Tensor, check: bool = True, impl: str = "auto") -> Tensor:
        """USDM ``alpha = T(gamma)``, differentiable: autograd gives the analytic ``dalpha/dgamma``.
        Runs the C++/CUDA op when it is built (:func:`lookup_backend`); no host synchronisation."""
        if check:
            self.check_range(gamma)
        dev = gamma.device
        if lookup_backend(dev, impl) == "cpp":
            return torch.ops.duo_fast.ttable_lookup(gamma, self.q(dev), self.dq(dev), self.gamma_min,
                                                    self.gamma_max, self.vocab_size)[0]
        return _AlphaFunction.apply(gamma, self)

    def __repr__(self) -> str:
        return (f"TTable(vocab_size={self.vocab_size}, gamma=[{self.gamma_min}, {self.gamma_max}], "
                f"num_points={self.num_points})")
