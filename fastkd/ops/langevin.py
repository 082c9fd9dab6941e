"""Langevin / noisy gradient step: ``fastkd.ops.langevin_step_``.

In place:

    x <- clamp(x - lr * (grad + tv_weight * d tv_loss(x, p=tv_p) / dx) + noise_std * xi, lo, hi)

with tv_loss's default ``reduction="mean"`` (``diagonal=False``), noise_std defaulting to
sqrt(2 * lr), and xi standard normal. lr (and noise_std) may be a float or a per-sample
tensor of shape (N,) (N = x.shape[0]). The TV gradient is taken at the old x.

Noise: xi comes from a counter-based generator (Philox4x32-10 + Box-Muller, described in
csrc/cake_ops.h): element e of x (row-major order) takes normal e % 4 of the Philox block
with counter e // 4 under the key ``seed``. The fused backends generate it inside the
kernel (no tensor of x's size is allocated); the torch backend materialises the same
stream with integer tensor ops. The same seed gives the same result on the same backend;
the backends agree with each other up to float rounding of log/sin/cos. ``seed=None``
draws a seed from torch's default CPU generator, so ``torch.manual_seed`` makes runs
reproducible.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from .. import _backend as B
from ._common import check_float, check_tensor, compute_dtype
from .tv import tv_loss_reference

__all__ = ["langevin_step_", "langevin_step_reference", "philox_normal"]

_OP = "langevin_step_"
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit words of a * m for int64 tensors a in [0, 2^32) without overflow."""
    t1 = a * (m & 0xFFFF)
    t2 = a * (m >> 16)
    r = ((t2 & 0xFFFF) << 16) + t1
    return (t2 >> 16) + (r >> 32), r & _MASK


def _philox_blocks(j: torch.Tensor, seed: int):
    x0, x1 = j & _MASK, j >> 32
    x2 = torch.zeros_like(j)
    x3 = torch.zeros_like(j)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    for _ in range(10):
        h0, l0 = _mulhilo(x0, _M0)
        h1, l1 = _mulhilo(x2, _M1)
        x0, x1, x2, x3 = h1 ^ x1 ^ k0, l1, h0 ^ x3 ^ k1, l0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return x0, x1, x2, x3


def philox_normal(n: int, seed: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """The normals xi of elements [offset, offset + n) for ``seed`` (float32, plain PyTorch)."""
    if n == 0:
        return torch.empty(0, device=device)
    j0, j1 = offset // 4, (offset + n - 1) // 4
    j = torch.arange(j0, j1 + 1, dtype=torch.int64, device=device)
    u = _philox_blocks(j, int(seed))
    out = []
    for ua, ub in ((u[0], u[1]), (u[2], u[3])):
        a = ((ua >> 8) + 1).to(torch.float64) * 2.0**-24
        b = (ub >> 8).to(torch.float64) * 2.0**-24
        r = torch.sqrt(-2.0 * torch.log(a))
        out += [r * torch.cos(2 * math.pi * b), r * torch.sin(2 * math.pi * b)]
    z = torch.stack(out, 1).reshape(-1).to(torch.float32)
    return z[offset - 4 * j0: offset - 4 * j0 + n]


def _per_sample(v, x: torch.Tensor, dtype):
    if isinstance(v, torch.Tensor):
        return v.to(device=x.device, dtype=dtype).view((-1,) + (1,) * (x.dim() - 1))
    return v


def langevin_step_reference(x: torch.Tensor, grad: torch.Tensor, lr, noise_std=None, clamp=None,
                            tv_weight: float = 0.0, tv_p: int = 1, seed: int = 0) -> torch.Tensor:
    """Plain-PyTorch step (returns the new x, leaves x unchanged); the specification."""
    acc = compute_dtype(x.dtype)
    xf = x.detach().to(acc)
    g = grad.detach().to(acc)
    if tv_weight != 0.0:
        with torch.enable_grad():
            xd = xf.clone().requires_grad_(True)
            (gt,) = torch.autograd.grad(tv_loss_reference(xd, p=tv_p, reduction="mean"), xd)
        g = g + tv_weight * gt
    if noise_std is None:
        noise_std = torch.sqrt(2.0 * lr) if isinstance(lr, torch.Tensor) else math.sqrt(2.0 * lr)
    new = xf - _per_sample(lr, xf, acc) * g
    if isinstance(noise_std, torch.Tensor) or noise_std != 0.0:
        z = philox_normal(x.numel(), seed, 0, x.device).view(x.shape).to(acc)
        new = new + _per_sample(noise_std, xf, acc) * z
    if clamp is not None:
        new = new.clamp(clamp[0], clamp[1])
    return new.to(x.dtype)


# --------------------------------------------------------------------------- checks
def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_rate(name: str, v, x: torch.Tensor, allow_zero: bool):
    """Validate a float or a per-sample (N,) tensor; returns (tensor or None, float)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(v, torch.Tensor):
        if not v.dtype.is_floating_point:
            raise TypeError(f"{_OP}: {name} tensor must be floating point, got dtype {v.dtype}")
        if v.dim() != 1 or v.shape[0] != x.shape[0]:
            raise ValueError(f"{_OP}: {name} tensor must have shape (N,) = ({x.shape[0]},), got "
                             f"{tuple(v.shape)}")
        if v.device != x.device:
            raise ValueError(f"{_OP}: {name} tensor must be on x's device {x.device}, got {v.device}")
        if not torch.compiler.is_compiling():
            bad = (v < 0) if allow_zero else (v <= 0)
            if bool((bad | ~torch.isfinite(v)).any()):
                raise ValueError(f"{_OP}: every {name} must be finite and {bound}, got minimum "
                                 f"{float(v.min())}")
        return v, 0.0
    if not _is_real(v):
        raise TypeError(f"{_OP}: {name} must be a float or a tensor of shape (N,), got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (v < 0 if allow_zero else v <= 0):
        raise ValueError(f"{_OP}: {name} must be finite and {bound}, got {v!r}")
    return None, v


def _check(x, grad, lr, noise_std, clamp, tv_weight, tv_p, seed):
    check_float("x", x, _OP)
    check_tensor("grad", grad, _OP)
    if x.dim() == 0:
        raise ValueError(f"{_OP}: x must have a batch dimension (N, ...), got a 0-D tensor")
    if grad.shape != x.shape:
        raise ValueError(f"{_OP}: grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    if grad.device != x.device:
        raise ValueError(f"{_OP}: grad must be on x's device {x.device}, got {grad.device}")
    if grad.dtype != x.dtype:
        raise TypeError(f"{_OP}: grad must have x's dtype {x.dtype}, got {grad.dtype}")
    lr_t, lr_s = _check_rate("lr", lr, x, allow_zero=False)
    if noise_std is None:
        std_t, std_s = (torch.sqrt(2.0 * lr_t), 0.0) if lr_t is not None \
            else (None, math.sqrt(2.0 * lr_s))
    else:
        std_t, std_s = _check_rate("noise_std", noise_std, x, allow_zero=True)
    if clamp is None:
        lo, hi = 0.0, 0.0
    else:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not all(_is_real(c) for c in clamp):
            raise TypeError(f"{_OP}: clamp must be None or a pair of numbers (lo, hi), got {clamp!r}")
        lo, hi = float(clamp[0]), float(clamp[1])
        if not lo < hi:
            raise ValueError(f"{_OP}: clamp must have lo < hi, got ({lo}, {hi})")
    if not _is_real(tv_weight):
        raise TypeError(f"{_OP}: tv_weight must be a float, got {type(tv_weight).__name__}")
    tv_weight = float(tv_weight)
    if not math.isfinite(tv_weight) or tv_weight < 0:
        raise ValueError(f"{_OP}: tv_weight must be finite and >= 0, got {tv_weight!r}")
    if isinstance(tv_p, bool) or tv_p not in (1, 2):
        raise ValueError(f"{_OP}: tv_p must be 1 or 2, got {tv_p!r}")
    if tv_weight != 0.0:
        if x.dim() != 4:
            raise ValueError(f"{_OP}: the TV prior (tv_weight > 0) needs x of shape (N, C, H, W), got "
                             f"shape {tuple(x.shape)}")
        if x.shape[2] < 2 and x.shape[3] < 2:
            raise ValueError(f"{_OP}: the TV prior needs H >= 2 or W >= 2, got shape {tuple(x.shape)}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)
                             or not 0 <= int(seed) < 2**63):
        raise ValueError(f"{_OP}: seed must be None or an integer in [0, 2**63), got {seed!r}")
    return lr_t, lr_s, std_t, std_s, clamp is not None, lo, hi, tv_weight


def draw_seed() -> int:
    """A seed from torch's default CPU generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _fused_op(name: str):
    if name == "triton":
        from ._triton import langevin as _tl  # noqa: F401  (registers the Triton op)

        return torch.ops.fastkd_triton.langevin_step_
    return torch.ops.fastkd.langevin_step_


# The CUDA kernel's fused TV prior keeps a tile of whole rows of at most this many elements.
CUDA_TV_MAX_WIDTH = 2048


def _resolve_backend(backend: str, device: torch.device, shape, tv_weight: float) -> str:
    """B.resolve, except that with the TV prior on images wider than CUDA_TV_MAX_WIDTH the
    cuda backend is skipped by "auto" (the next one in line runs) and refused by name."""
    be = B.resolve(_OP, backend, device)
    if be != "cuda" or tv_weight == 0.0 or shape[-1] <= CUDA_TV_MAX_WIDTH:
        return be
    if backend == "auto" and (os.environ.get("FASTKD_BACKEND") or "auto") == "auto":
        return B.resolve(_OP, "auto", device, supported=tuple(b for b in B.BACKENDS if b != "cuda"))
    raise B.BackendUnavailableError(
        f"{_OP}: backend 'cuda' applies the TV prior (tv_weight > 0) to images of width at most "
        f"{CUDA_TV_MAX_WIDTH}, got width {shape[-1]}; use backend 'auto', 'triton' or 'torch'")


@torch.no_grad()
def langevin_step_(x: torch.Tensor, grad: torch.Tensor, lr, *, noise_std=None, clamp=None,
                   tv_weight: float = 0.0, tv_p: int = 1, seed: int | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """One Langevin step on x, in place; returns x.

    Args:
        x: float tensor (N, ...); (N, C, H, W) when ``tv_weight > 0``.
        grad: d loss / d x, same shape, dtype and device as x.
        lr: step size > 0, a float or a float tensor of shape (N,) (one per sample).
        noise_std: standard deviation of the added noise, a float >= 0 or a tensor (N,);
            default sqrt(2 * lr). 0 gives a plain gradient step.
        clamp: None or (lo, hi) with lo < hi: clamp the result to [lo, hi].
        tv_weight: weight of the total-variation prior whose gradient is added to grad
            (``tv_loss(x, p=tv_p, reduction="mean")``, taken at the old x).
        tv_p: 1 or 2, as in :func:`fastkd.ops.tv_loss`.
        seed: integer in [0, 2**63) selecting the noise; None draws one from torch's
            default generator.
        backend: "auto", "cuda", "triton", "cpp" or "torch".
    """
    lr_t, lr_s, std_t, std_s, do_clamp, lo, hi, tv_weight = _check(
        x, grad, lr, noise_std, clamp, tv_weight, tv_p, seed)
    be = _resolve_backend(backend, x.device, x.shape, tv_weight)
    if seed is None and (std_t is not None or std_s != 0.0):
        seed = draw_seed()
    seed = 0 if seed is None else int(seed)
    if be == "torch":
        new = langevin_step_reference(x, grad, lr_t if lr_t is not None else lr_s,
                                      std_t if std_t is not None else std_s,
                                      (lo, hi) if do_clamp else None, tv_weight, tv_p, seed)
        return x.copy_(new)
    xc = x if x.is_contiguous() else x.contiguous()
    _fused_op(be)(xc, grad.contiguous(), lr_t, lr_s, std_t, std_s, do_clamp, lo, hi, tv_weight,
                  int(tv_p), seed)
    if xc is not x:
        x.copy_(xc)
    return x


# --------------------------------------------------------------------------- registration
def _fake(x, grad, lr_t, lr, std_t, noise_std, do_clamp, lo, hi, tv_weight, tv_p, seed):
    return None


def register_cpp() -> None:
    torch.library.register_fake("fastkd::langevin_step_")(_fake)


if B.has_extension() and hasattr(torch.ops.fastkd, "langevin_step_"):
    register_cpp()
