"""The one place that decides which implementation of every operator runs, and why.

Implementations: ``triton`` (the kernels of ``duo_fast.kernels``: CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``), ``cpp`` (the C++ ops of ``csrc/``: the T-table lookup on CPU and
CUDA, the RB loss statistics and gradient on CPU), ``torch`` (plain PyTorch, any device), and for
attention ``flash-attn`` or ``sdpa``.

Rules (:func:`choose`): ``auto`` takes Triton where it can run, else the C++ op where it is built
and has a kernel for the device, else PyTorch. ``impl=`` on an operator, ``DUO_FAST_IMPL``
(``auto``, ``torch``, ``triton``: the fused operators) and ``DUO_FAST_TTABLE_IMPL`` (``auto``,
``cpp``, ``torch``: the T-table lookup) force one; a forced implementation that cannot run
raises, an unknown value raises with one line naming the variable. ``torch`` for the RB loss
means "not Triton": its PyTorch path runs the C++ op on CPU where it is built (reported as
``cpp``). Only ``auto`` chooses quietly.

Every operator calls :func:`choose` and records what ran (:data:`LAST_RUN`, a host dict: no
device work), so ``duo_fast.ops.backend()`` and ``duo-fast env``, which print :func:`report`,
say what the operators do (``tests/ops/test_backends.py``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from duo_fast.core.noise_schedule import per_token

__all__ = ["IMPLS", "OPERATORS", "Choice", "choose", "report", "use_triton", "check_environment", "LAST_RUN",
           "seed_from", "token_rows", "flash_attn_func", "rb_cpp_available", "run_impl"]

IMPLS = ("auto", "torch", "triton")
TTABLE_IMPLS = ("auto", "cpp", "torch")
# operator -> the implementations it has, in the order ``auto`` prefers them
OPERATORS: dict[str, tuple[str, ...]] = {
    "ttable_lookup": ("cpp", "torch"),
    "rb_loss": ("triton", "cpp", "torch"),
    "rb_loss_linear": ("triton", "cpp", "torch"),
    "relaxed_embedding": ("triton", "torch"),
    "sample_posterior": ("triton", "torch"),
    "sample_posterior_linear": ("triton", "torch"),
    "coupled_latents": ("torch",),
    "attention": ("flash-attn", "sdpa"),
}
LAST_RUN: dict[str, str] = {}     # operator -> the implementation its last call ran


@dataclass(frozen=True)
class Choice:
    """An operator's implementation on a device and the reason it was chosen."""

    impl: str
    why: str


def _env(var: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(var, "auto")
    if value not in allowed:
        raise ValueError(f"{var}={value!r} is not one of {', '.join(allowed)}")
    return value


def check_environment() -> None:
    """Raise ``ValueError`` (one line naming the variable) for an unknown ``DUO_FAST_IMPL`` or
    ``DUO_FAST_TTABLE_IMPL``."""
    _env("DUO_FAST_IMPL", IMPLS)
    _env("DUO_FAST_TTABLE_IMPL", TTABLE_IMPLS)


def _device(where: torch.Tensor | torch.device | str) -> torch.device:
    return where.device if isinstance(where, torch.Tensor) else torch.device(where)


def _triton(op: str, device: torch.device, impl: str) -> Choice | None:
    """The Triton decision of a fused operator: a Choice when Triton runs or torch is forced, None
    when ``auto`` finds no Triton (the caller falls through); raises for a forced Triton that cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    forced = impl != "auto"
    if not forced:
        impl = _env("DUO_FAST_IMPL", IMPLS)
    source = f"impl={impl!r}" if forced else f"DUO_FAST_IMPL={impl}"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    runnable = device.type == "cuda" or (interpret and device.type == "cpu")
    if impl == "torch":
        return Choice("torch", f"{source} forces the PyTorch path")
    if impl == "triton" and not runnable:
        raise RuntimeError(f"{op}: {source} needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    if runnable:
        if device.type == "cpu":
            return Choice("triton", "TRITON_INTERPRET=1: the Triton kernels run as Python on CPU tensors")
        return Choice("triton", f"Triton kernels on {device}")
    return None


@functools.cache
def rb_cpp_available() -> bool:
    """Whether the fused C++ CPU RB op (csrc/rb_loss_cpu.cpp) is built and this CPU runs it."""
    from duo_fast.ops import extension

    if extension.SOURCE == "fallback":
        return False
    try:
        return bool(torch.ops.duo_fast.rb_cpu_supported())
    except (AttributeError, RuntimeError):          # an older cached build without the op
        return False


def _cpp_source() -> str:
    from duo_fast.ops import extension

    return {"prebuilt": "C++ op prebuilt at install (duo_fast._C)",
            "jit": f"C++ op compiled on first use, cached in {extension.jit_build_dir()}"}.get(extension.SOURCE,
                                                                                           extension.SOURCE)


def _ttable(device: torch.device, impl: str) -> Choice:
    from duo_fast.ops import extension

    if impl not in TTABLE_IMPLS:
        raise ValueError(f"T-table lookup impl must be auto, cpp or torch, got {impl!r}")
    source = f"impl={impl!r}"
    if impl == "auto":
        impl = _env("DUO_FAST_TTABLE_IMPL", TTABLE_IMPLS)
        source = f"DUO_FAST_TTABLE_IMPL={impl}"
    if impl == "torch":
        return Choice("torch", f"{source} forces the PyTorch lookup")
    ok = extension.AVAILABLE and (device.type == "cpu" or torch._C._dispatch_has_kernel_for_dispatch_key(
        "duo_fast::ttable_lookup", "CUDA" if device.type == "cuda" else device.type.upper()))
    if ok:
        return Choice("cpp", _cpp_source())
    if impl == "cpp":
        raise RuntimeError(f"the C++ T-table lookup is not available on {device} "
                           f"({extension.IMPORT_ERROR or 'no kernel'})")
    extension.warn_fallback_once()
    err = str(extension.IMPORT_ERROR).splitlines()[0][:160] if extension.IMPORT_ERROR else "no kernel for this device"
    return Choice("torch", f"the C++ op is unavailable ({err})")


def choose(op: str, where: torch.Tensor | torch.device | str, impl: str = "auto") -> Choice:
    """The implementation of operator ``op`` for tensors on ``where`` (a tensor or a device)."""
    if op not in OPERATORS:
        raise KeyError(f"unknown operator {op!r}; known: {', '.join(OPERATORS)}")
    device = _device(where)
    if op == "ttable_lookup":
        return _ttable(device, impl)
    if op == "coupled_latents":
        return Choice("torch", "O(1) per token: plain PyTorch on any device")
    if op == "attention":
        if flash_attn_func() is not None and device.type == "cuda":
            return Choice("flash-attn", "flash-attn installed: bf16/fp16 tensors on CUDA")
        return Choice("sdpa", "torch.nn.functional.scaled_dot_product_attention")
    choice = _triton(op, device, impl)
    if choice is not None and choice.impl == "triton":
        return choice
    if op in ("rb_loss", "rb_loss_linear") and device.type == "cpu" and rb_cpp_available():
        lead = f"{choice.why}; on CPU that is" if choice is not None else "CPU tensors:"
        return Choice("cpp", f"{lead} the fused C++ op (csrc/rb_loss_cpu.cpp, {_cpp_source()})")
    if choice is not None:
        return choice
    return Choice("torch", "chunked PyTorch path: the Triton kernels need CUDA tensors")


def run_impl(op: str, t: torch.Tensor | torch.device, impl: str = "auto") -> str:
    """The implementation operator ``op`` runs now, recorded in :data:`LAST_RUN`: what an operator
    calls when it is about to run (a report that runs nothing uses :func:`choose`)."""
    ran = choose(op, t, impl).impl
    LAST_RUN[op] = ran
    return ran


def use_triton(t: torch.Tensor, impl: str, op: str) -> bool:
    """Whether operator ``op`` runs its Triton kernels on ``t``'s device (:func:`run_impl`)."""
    return run_impl(op, t, impl) == "triton"


def report(device: torch.device | str = "cpu") -> dict[str, Choice]:
    """Every operator's :class:`Choice` on ``device``; an error in place of a choice that raises."""
    out = {}
    for op in OPERATORS:
        try:
            out[op] = choose(op, device)
        except (RuntimeError, ValueError) as e:
            out[op] = Choice("error", str(e))
    return out


@functools.cache
def flash_attn_func():  # noqa: ANN201 - the optional package's function, or None
    """``flash_attn.flash_attn_func`` where flash-attn installs, else None."""
    try:
        from flash_attn import flash_attn_func as f
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return f


def seed_from(seed: int | None, generator: torch.Generator | None) -> int:
    """A 62-bit seed for the Triton kernels: ``seed`` itself, else one drawn from ``generator``
    (or torch's default CPU generator). Drawn on the CPU: no device synchronisation."""
    if seed is not None:
        return int(seed) & ((1 << 62) - 1)
    gen = generator if generator is not None and generator.device.type == "cpu" else None
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def token_rows(v: torch.Tensor | float | None, zt: torch.Tensor) -> torch.Tensor | None:
    """A scalar, per-sequence (B,) or per-token (B, L) value as a contiguous float64 (B * L,)
    row vector on ``zt``'s device (None stays None)."""
    if v is None:
        return None
    return per_token(v, zt).to(device=zt.device, dtype=torch.float64).expand(zt.shape).reshape(-1).contiguous()
