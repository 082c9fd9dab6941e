"""Argument checks shared by the ops: errors name the argument and what it received."""
from __future__ import annotations

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def check_tensor(name: str, t, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t: torch.Tensor, op: str) -> None:
    check_tensor(name, t, op)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got dtype {t.dtype}")


def check_float_pair(op: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """a and b: floating-point tensors of one dtype on one device (errors name both)."""
    check_float("a", a, op)
    check_float("b", b, op)
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: a and b must have the same dtype, got a {a.dtype} and b {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: a and b must be on the same device, got a on {a.device} and b on {b.device}")


def check_reduction(reduction, op: str, allowed=("none", "mean", "sum")) -> int:
    if reduction not in allowed:
        raise ValueError(f"{op}: reduction must be one of {allowed}, got {reduction!r}")
    return REDUCTIONS[reduction]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for reduced precision, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)`` for a kernel launched inside a ``triton_op``.

    Under ``TRITON_INTERPRET=1`` ``@triton.jit`` makes an interpreted function, which runs
    eagerly and has nothing to trace: it is returned as it is. (Newer torch releases do this
    themselves; older ones, 2.11 among them, raise "wrap_triton only works on functions
    annotated with triton.jit or triton.autotune".)
    """
    if _interpreted(kernel):
        return kernel
    return torch.library.wrap_triton(kernel)


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    for _ in range(8):  # @triton.autotune / @triton.heuristics keep the kernel they wrap in .fn
        if isinstance(kernel, InterpretedFunction):
            return True
        kernel = getattr(kernel, "fn", None)
        if kernel is None:
            return False
    return False


# --------------------------------------------------------------------------- Triton ops' autograd
#: Triton op name -> factory(triton module) -> (backward, setup_context). Each op module
#: (``ops/<op>.py``) states its Triton op's autograd here at import time; the Triton module
#: (``ops/_triton/<op>.py``, which imports only this module) registers it when it is loaded.
#: So the formula is written once, beside the op, and ``_triton`` never imports an op module.
TRITON_AUTOGRAD: dict = {}


def triton_autograd(name: str, factory) -> None:
    """Declare the autograd of Triton op ``name`` (called by the op module)."""
    TRITON_AUTOGRAD[name] = factory


def register_triton_autograd(name: str, module) -> None:
    """Register the declared autograd of ``name`` (called by the Triton module once it has
    defined the op)."""
    backward, setup = TRITON_AUTOGRAD[name](module)
    torch.library.register_autograd(name, backward, setup_context=setup)


def tv_num_terms(shape, diagonal: bool = False) -> int:
    """Number of difference terms of a (N, C, H, W) batch (the divisor of ``"mean"``)."""
    n, c, h, w = shape
    per = (h - 1) * w + h * (w - 1) + (2 * (h - 1) * (w - 1) if diagonal else 0)
    return n * c * per


def sqdist_recompute_tau(dtype: torch.dtype) -> float:
    """Relative size under which a squared distance from the GEMM form is recomputed directly
    (cancellation): 1/64 in fp32/fp16, 1e-7 in fp64."""
    return 1e-7 if dtype == torch.float64 else 1.0 / 64.0

